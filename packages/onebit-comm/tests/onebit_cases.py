"""Rank functions for the onebit-comm tests (importable by name, as zero_testkit needs).

The inputs of every round are a pure function of (rank, case, round), so the test process can
rebuild them and run the single-process reference on the very same numbers.
"""

from __future__ import annotations

from typing import Any

# Results go back to the test process by value (numpy arrays), never as shared-memory tensors.
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from onebit_comm import (
    CommStats,
    OneBitAdam,
    OneBitLamb,
    PendingErrors,
    ZeroOneAdam,
    compressed_allreduce,
    error_buffers,
)

# (shape) cases: sizes that are and are not multiples of 8 x world size, 2-D, tiny, empty.
SHAPES: list[tuple[int, ...]] = [(4096,), (1001,), (3, 7), (1,), (0,), (64, 33)]
ROUNDS = 4


def make_input(rank: int, case: int, rnd: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Deterministic input of ``rank`` for ``case`` in round ``rnd`` (a shared offset plus noise)."""
    g = torch.Generator().manual_seed(1000 * case + 10 * rnd + rank)
    base = torch.Generator().manual_seed(77 + case)
    return torch.randn(shape, generator=base) + 0.5 * torch.randn(shape, generator=g)


def allreduce_rounds(rank: int, world: int) -> list[list[dict[str, Any]]]:
    """For every shape, ``ROUNDS`` calls with persistent error buffers: result, errors and bytes after each."""
    out = []
    for case, shape in enumerate(SHAPES):
        n = int(torch.Size(shape).numel())
        we, se = error_buffers(n, world)
        rounds = []
        for rnd in range(ROUNDS):
            x = make_input(rank, case, rnd, shape)
            stats = CommStats()
            y = compressed_allreduce(x, we, se, stats=stats)
            assert y is x
            rounds.append(
                {
                    "result": x.numpy().copy(),
                    "worker_error": we.numpy().copy(),
                    "server_error": se.numpy().copy(),
                    "bytes": stats.bytes_sent,
                }
            )
        out.append(rounds)
    return out


# ---- a tiny GPT and its data ------------------------------------------------------------------------

VOCAB, SEQ, D, LAYERS = 32, 16, 32, 2


class Block(nn.Module):
    """Pre-norm attention + MLP block."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A 2-layer, 32-wide GPT over a 32-token vocabulary (about 28k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(SEQ, D)
        self.blocks = nn.ModuleList(Block(D, 2) for _ in range(LAYERS))
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def batch(step: int, rank: int, micro: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: sequences ``x[t+1] = (x[t] + s) % VOCAB`` with random start and s."""
    g = torch.Generator().manual_seed(100_003 * step + rank)
    start = torch.randint(0, VOCAB, (micro, 1), generator=g)
    stride = torch.randint(1, 6, (micro, 1), generator=g)
    seq = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


class Lamb(torch.optim.Optimizer):
    """Plain LAMB as DeepSpeed's OneBitLamb warm-up defines it (no bias correction, clamped trust ratio).

    The reference for 1-bit LAMB: on averaged gradients, per parameter
    ``u = m / (sqrt(v) + eps) + wd * p``, ``p -= lr * clamp(||p|| / ||u||, min_coeff, max_coeff) * u``.
    """

    def __init__(
        self, params: Any, lr: float, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_coeff=10.0, min_coeff=0.01
    ):
        super().__init__(
            params,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_coeff=max_coeff, min_coeff=min_coeff),
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = st["m"] / (st["v"].sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    u.add_(p, alpha=group["weight_decay"])
                wn, un = float(p.norm()), float(u.norm())
                coeff = 1.0 if wn == 0 or un == 0 else min(max(wn / un, group["min_coeff"]), group["max_coeff"])
                p.add_(u, alpha=-group["lr"] * coeff)


def _make_optimizer(name: str, params: Any, kw: dict[str, Any]) -> tuple[torch.optim.Optimizer, bool]:
    """(optimizer, whether the loop must all-reduce gradients itself)."""
    if name == "AdamW":
        return torch.optim.AdamW(params, weight_decay=0.0, **kw), True
    if name == "Lamb":
        return Lamb(params, **kw), True
    cls = {"OneBitAdam": OneBitAdam, "ZeroOneAdam": ZeroOneAdam, "OneBitLamb": OneBitLamb}[name]
    return cls(params, **kw), False


def run_key(name: str, kw: dict[str, Any]) -> str:
    """The key :func:`train` files a run under."""
    return f"{name}:{sorted(kw.items())}"


def train(rank: int, world: int, runs: list[tuple[str, dict[str, Any]]], steps: int) -> dict[str, Any]:
    """Train the tiny GPT once per ``(optimizer name, kwargs)``, same init and data; per-run loss curve and bytes."""
    # One intra-op thread per rank: the ranks already share the cores, and a tiny model gains nothing
    # from more (here 2 threads made a step 15x slower on a loaded 2-core machine).
    torch.set_num_threads(1)
    out = {}
    for name, kw in runs:
        torch.manual_seed(0)
        model = TinyGPT()
        opt, loop_reduces = _make_optimizer(name, model.parameters(), kw)
        losses = []
        for step in range(steps):
            x, y = batch(step, rank)
            loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if loop_reduces and world > 1:
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad.mul_(1.0 / world)
            opt.step()
            ls = loss.detach().clone()
            dist.all_reduce(ls)
            losses.append(float(ls) / world)
        # 0/1 Adam's local steps leave ranks apart between synchronisations; report rank 0's copy.
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        out[run_key(name, kw)] = {
            "losses": losses,
            "bytes": getattr(getattr(opt, "stats", None), "bytes_sent", 0),
            "params": flat.numpy(),
        }
    return out


def resume(rank: int, world: int, name: str, kw: dict[str, Any], save_at: int, steps: int) -> dict[str, Any]:
    """Train to ``save_at``, copy the model and optimizer ``state_dict``, train on; rebuild, load, train the same steps."""
    torch.set_num_threads(1)

    def run(model: nn.Module, opt: torch.optim.Optimizer, lo: int, hi: int) -> None:
        for step in range(lo, hi):
            x, y = batch(step, rank)
            opt.zero_grad(set_to_none=True)
            model(x, y).backward()
            opt.step()

    torch.manual_seed(0)
    model = TinyGPT()
    opt, _ = _make_optimizer(name, model.parameters(), kw)
    run(model, opt, 0, save_at)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    # torch's state_dict holds references to the live state: deep-copy the tensors.
    saved_opt["state"] = {
        i: {k: v.clone() if torch.is_tensor(v) else (list(v) if isinstance(v, list) else v) for k, v in st.items()}
        for i, st in saved_opt["state"].items()
    }
    keys = sorted(saved_opt["state"][0])
    run(model, opt, save_at, steps)
    want = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    torch.manual_seed(1)
    model2 = TinyGPT()
    model2.load_state_dict(saved_model)
    opt2, _ = _make_optimizer(name, model2.parameters(), kw)
    opt2.load_state_dict(saved_opt)
    run(model2, opt2, save_at, steps)
    got = torch.cat([p.detach().reshape(-1) for p in model2.parameters()])
    return {"want": want.numpy(), "got": got.numpy(), "state_keys": keys}


def fused_vs_torch_rounds(rank: int, world: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The collective on ds-native's fused kernels and on torch ops, side by side, over a few rounds.

    Sizes of several 64 Ki pieces per chunk, fp32 and bf16 (decoded into a scratch buffer, then cast).
    Also checks that ``fused=True`` refuses a float64 tensor with an error naming what it needs.
    """
    out = []
    for shape, dtype in (((300_001,), torch.float32), ((513, 257), torch.bfloat16)):
        n = int(torch.Size(shape).numel())
        bufs = {f: error_buffers(n, world) for f in (True, False)}
        for rnd in range(3):
            x = make_input(rank, 7, rnd, shape).to(dtype)
            pair = []
            for f in (True, False):
                y = x.clone()
                compressed_allreduce(y, *bufs[f], fused=f)
                pair.append(
                    {
                        "result": y.float().numpy().copy(),
                        "worker_error": bufs[f][0].numpy().copy(),
                        "server_error": bufs[f][1].numpy().copy(),
                    }
                )
            out.append(tuple(pair))
    try:
        compressed_allreduce(torch.zeros(8, dtype=torch.float64), *error_buffers(8, world), fused=True)
    except ValueError as e:
        assert "fused=True" in str(e)
    else:
        raise AssertionError("fused=True accepted a float64 tensor")
    return out


def deferred_vs_exact_rounds(rank: int, world: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The collective with deferred error updates (``pending=``) against the exact torch path, round by round.

    Per round: both results, the exact path's error buffers, and the deferred buffers as settled
    (a settled copy; in round 2 the buffers themselves are settled in place, so the next round
    starts from settled buffers with nothing pending). Sizes with padding and several 64 Ki pieces.
    """
    out = []
    for case, (shape, dtype) in enumerate(
        (((300_001,), torch.float32), ((513, 257), torch.bfloat16), ((1001,), torch.float32))
    ):
        n = int(torch.Size(shape).numel())
        exact, lazy = error_buffers(n, world), error_buffers(n, world)
        pending = PendingErrors()
        for rnd in range(4):
            x = make_input(rank, 20 + case, rnd, shape).to(dtype)
            y_exact, y_lazy = x.clone(), x.clone()
            compressed_allreduce(y_exact, *exact, fused=False)
            compressed_allreduce(y_lazy, *lazy, pending=pending)
            assert pending.active and pending.scales.shape == (world + 1,)
            if rnd == 2:
                pending.settle_(*lazy, n)
                assert not pending.active
                settled = lazy
            else:
                settled = (lazy[0].clone(), lazy[1].clone())
                PendingErrors(pending.scales.clone()).settle_(*settled, n)
            out.append(
                (
                    {"result": y_exact.float().numpy(), "we": exact[0].numpy().copy(), "se": exact[1].numpy().copy()},
                    {
                        "result": y_lazy.float().numpy(),
                        "we": settled[0].numpy().copy(),
                        "se": settled[1].numpy().copy(),
                    },
                )
            )
    return out


def deferred_vs_exact_training(rank: int, world: int, name: str, kw: dict[str, Any], steps: int) -> dict[str, Any]:
    """The same training with the optimizer's deferred error updates on and off; a state_dict taken mid-way.

    Returns per mode the final parameters and the error buffers of the mid-way and final state_dicts
    (state_dict settles a deferred update, and training goes on from the settled buffers).
    """
    torch.set_num_threads(1)
    out = {}
    for defer in (True, False):
        torch.manual_seed(0)
        model = TinyGPT()
        opt, _ = _make_optimizer(name, model.parameters(), kw)
        opt.defer_error_updates = defer
        snaps = []
        for step in range(steps):
            x, y = batch(step, rank)
            opt.zero_grad(set_to_none=True)
            model(x, y).backward()
            opt.step()
            if step in (steps // 2, steps - 1):
                sd = opt.state_dict()["state"]
                assert all("error_pending_scales" not in st for st in sd.values())
                snaps.append({f"{i}/{k}": st[k].numpy().copy() for i, st in sd.items() for k in st if "error" in k})
        out[str(defer)] = {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()}
        out[str(defer)].update({f"snap{j}/{k}": v for j, s in enumerate(snaps) for k, v in s.items()})
    return out
