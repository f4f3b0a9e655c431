"""ZeRO stages 1 and 2 against torch DDP, side by side in one run: step time and per-rank memory.

A tiny GPT (default 8 layers, d 512) trains on 2 gloo ranks on CPU, one thread per rank. Modes:

  ddp            torch DDP (gradient_as_bucket_view) + torch.optim.AdamW(fused=True), fp32
  zero1 / zero2  ZeroShardedOptimizer stage 1 / 2 with zero_shard.default_optimizer_factory
                 (ds-native CPUAdam), collectives chosen for the backend (gloo: all-reduce based)
  zero2-rs       stage 2 forced to the textbook collectives (reduce to owners + all-gather)
  zero3          stage 3: per-module units partitioned 1/N, gathered before use (prefetch from the recorded
                 order, ``"auto"`` sizes from d: prefetch 0.9·d², persistence threshold 10·d)
  zero3-noprefetch  the same with stage3_prefetch_bucket_size 0 (every gather on demand)
  fsdp2          torch's FSDP2 (``fully_shard`` on every block, then the root) + torch.optim.AdamW, the peer
                 design for stage 3
  ds1/ds2/ds3    DeepSpeed ZeRO stage 1 / 2 / 3 with the same model and batch, when ``deepspeed`` imports

Step time: the median over round-robin steps (each mode steps in turn, so noise from other processes
falls on all of them alike), rank 0's clock, ranks started together by a barrier. Memory, one mode
alive at a time: the model-state bytes the rank holds (parameters, gradients, fp32 master, optimizer
states, counted from the tensors) and the peak RSS growth while the mode builds and takes 2 steps
(sampled every 2 ms), next to the ZeRO paper's mixed-precision formula for the bf16 rows
(stage 1: 4Φ + 12Φ/N bytes, stage 2: 2Φ + 14Φ/N, stage 3: 16Φ/N; DDP: 16Φ). A collective probe measures gloo's
all_reduce / reduce_scatter / all_gather / reduce / broadcast-per-owner bus bandwidth, the figures the per-backend choice in
zero_shard.comm rests on.

    python benchmarks/zero_step.py [--quick] [--json PATH] [--layers 8] [--d-model 512] [--steps 6]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import threading
import time
import warnings
from datetime import UTC, datetime
from typing import Any

# This folder holds benchmarks named after packages (benchmarks/amp_scaler.py): keep it off the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from zero_shard import CollectiveChoice, ZeroConfig, ZeroShardedOptimizer, default_optimizer_factory  # noqa: E402
from zero_shard.comm import gather_partitions  # noqa: E402

LR = 1e-4


# ---- the model ---------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, layers: int, d: int, vocab: int, seq: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, max(1, d // 64)) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


# ---- one mode = a model plus how it steps ------------------------------------------------------------


class Mode:
    """A model, its optimizer and a step function; ``state_bytes`` counts what the rank holds."""

    def __init__(self, name: str, args: argparse.Namespace, dtype: torch.dtype) -> None:
        torch.manual_seed(0)
        self.name, self.dtype = name, dtype
        self.model = TinyGPT(args.layers, args.d_model, args.vocab, args.seq)
        self.numel = sum(p.numel() for p in self.model.parameters())
        self.opt: Any = None
        if name == "ddp":
            self.model.to(dtype)
            self.net = nn.parallel.DistributedDataParallel(self.model, gradient_as_bucket_view=True)
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, fused=True)
        elif name == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
            for blk in self.model.blocks:
                fully_shard(blk, mesh=mesh, mp_policy=mp_policy)
            fully_shard(self.model, mesh=mesh, mp_policy=mp_policy)
            self.net = self.model
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, foreach=True)
        elif name.startswith("zero"):
            stage = int(name[4])
            d = args.d_model
            stage3 = {"stage3_prefetch_bucket_size": 0 if name.endswith("noprefetch") else int(0.9 * d * d)}
            stage3["stage3_param_persistence_threshold"] = 10 * d
            cfg = ZeroConfig(
                stage=stage,
                overlap_comm=True,
                reduce_bucket_size=args.bucket,
                allgather_bucket_size=int(5e8),
                **(stage3 if stage == 3 else {}),
            )
            coll = CollectiveChoice("reduce", "all_gather") if name.endswith("-rs") else None
            self.opt = ZeroShardedOptimizer(
                list(self.model.named_parameters()),
                default_optimizer_factory(lr=LR),
                cfg,
                compute_dtype=dtype,
                collectives=coll,
                module=self.model if stage == 3 else None,
            )
            self.net = self.model
        else:  # DeepSpeed
            import deepspeed

            ds_cfg = {
                "train_micro_batch_size_per_gpu": args.batch,
                "gradient_accumulation_steps": 1,
                "optimizer": {"type": "AdamW", "params": {"lr": LR}},
                "zero_optimization": {
                    "stage": int(name[2]),
                    "overlap_comm": True,
                    "reduce_bucket_size": args.bucket,
                    **(
                        {
                            "stage3_prefetch_bucket_size": int(0.9 * args.d_model**2),
                            "stage3_param_persistence_threshold": 10 * args.d_model,
                        }
                        if name == "ds3"
                        else {"allgather_bucket_size": int(5e8)}
                    ),
                },
                "bf16": {"enabled": dtype == torch.bfloat16},
            }
            self.net, self.opt, _, _ = deepspeed.initialize(
                model=self.model, model_parameters=self.model.parameters(), config=ds_cfg
            )

    def step(self, idx: torch.Tensor, tgt: torch.Tensor) -> None:
        logits = self.net(idx).float()
        loss = nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.reshape(-1))
        if self.name == "ddp":
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=False)  # keep the bucket views, as a training loop would
        elif self.name == "fsdp2":
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
        elif self.name.startswith("zero"):
            self.opt.backward(loss)
            self.opt.step()
        else:
            self.net.backward(loss)
            self.net.step()

    def state_bytes(self) -> int:
        if self.name.startswith("zero"):
            return sum(self.opt.state_bytes().values())
        if self.name == "fsdp2":
            # The local shards (DTensor.to_local()): sharded parameters, gradients, Adam states.
            local = [p.to_local() for p in self.model.parameters()]
            local += [p.grad.to_local() for p in self.model.parameters() if p.grad is not None]
            for s in self.opt.state.values():
                local += [t.to_local() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
            return sum(t.numel() * t.element_size() for t in local)
        tensors = {id(p): p for p in self.model.parameters()}
        tensors |= {id(p.grad): p.grad for p in self.model.parameters() if p.grad is not None}
        if self.name == "ddp":
            for s in self.opt.state.values():
                tensors |= {id(t): t for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0}
            return sum(t.numel() * t.element_size() for t in tensors.values())
        return -1  # DeepSpeed keeps its partitions internally; peak RSS is the comparable figure


# ---- measurements on each rank -------------------------------------------------------------------------


def _release_free_memory() -> None:
    """Hand memory freed by earlier modes back to the OS, so that RSS growth measures only this mode."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every 2 ms in a thread; ``peak`` is the highest value seen."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = _rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _batch(args: argparse.Namespace, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank * 100_003 + step)
    idx = torch.randint(args.vocab, (args.batch, args.seq + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def _collective_probe(numel: int, reps: int) -> dict[str, float]:
    """Bus bandwidth (GB/s, nccl-tests convention) of the collectives ZeRO could use, fp32."""
    n = dist.get_world_size()
    x = torch.randn(numel)
    out = torch.empty(numel)
    part = torch.empty(numel // n)
    ops = {
        "all_reduce": (lambda: dist.all_reduce(x), 2 * (n - 1) / n),
        "reduce_scatter": (lambda: dist.reduce_scatter_tensor(part, x), (n - 1) / n),
        "all_gather": (lambda: dist.all_gather_into_tensor(out, part), (n - 1) / n),
        "reduce": (lambda: dist.reduce(x, dst=0), 1.0),
        # What zero_shard.comm does on gloo to share updated partitions: one broadcast per owner, all in flight.
        "broadcast_gather": (
            lambda: gather_partitions(out, numel // n, dist.get_rank(), n, method="broadcast", bucket_numel=numel),
            (n - 1) / n,
        ),
    }
    res = {}
    for name, (fn, factor) in ops.items():
        fn()
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        res[name] = numel * 4 * factor / statistics.median(times) / 1e9
    return res


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, modes: list[str], queue: Any) -> None:
    try:
        torch.set_num_threads(args.threads)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        out: dict[str, Any] = {"memory": {}, "time": {}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.13 renamed the *_tensor collectives
            out["collectives"] = _collective_probe(args.probe_numel, 3 if args.quick else 10)
        idx, tgt = _batch(args, rank, 0)
        # Warm-up, discarded: one-time costs (DDP and gloo set-up, kernel caches) must not land on whichever
        # mode happens to be measured first.
        for name, dtype in (("ddp", torch.float32), ("zero1", torch.bfloat16)):
            Mode(name, args, dtype).step(idx, tgt)
        gc.collect()
        # Memory: one mode alive at a time.
        for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for name in modes:
                if (name == "ddp" and dname == "bf16") or name in ("zero2-rs", "zero3-noprefetch"):
                    continue
                _release_free_memory()
                base = _rss()
                with PeakRSS() as peak:
                    m = Mode(name, args, dtype)
                    for _ in range(2):
                        m.step(idx, tgt)
                out["memory"][f"{dname}/{name}"] = {
                    "numel": m.numel,
                    "model_state_bytes": m.state_bytes(),
                    "peak_rss_delta_bytes": peak.peak - base,
                }
                del m
                gc.collect()
        # Time: every mode alive, stepping round-robin.
        built = {name: Mode(name, args, torch.float32) for name in modes}
        times: dict[str, list[float]] = {name: [] for name in modes}
        for step in range(args.steps + 1):
            idx, tgt = _batch(args, rank, step)
            # Rotate the order every step so that no mode always runs right after the same other one.
            order = modes[step % len(modes) :] + modes[: step % len(modes)]
            for name in order:
                m = built[name]
                dist.barrier()
                t0 = time.perf_counter()
                m.step(idx, tgt)
                if step > 0:  # the first step is warm-up (allocations, optimizer state)
                    times[name].append(time.perf_counter() - t0)
        out["time"] = {name: statistics.median(ts) for name, ts in times.items()}
        queue.put((rank, "ok", out))
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
        import traceback

        queue.put((rank, "error", f"{exc!r}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, modes: list[str]) -> list[dict[str, Any]]:
    # A fixed mmap threshold: glibc otherwise raises it after big frees and serves later big tensors from
    # the heap, which it does not return to the OS; RSS growth per mode would then depend on mode order.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, args.world, port, args, modes, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            rank, status, value = queue.get(timeout=args.timeout)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(args.world)]


# ---- report -------------------------------------------------------------------------------------------


def _formula(dname: str, name: str, numel: int, n: int) -> float | None:
    """Expected model-state bytes per rank.

    bf16: the ZeRO paper's mixed-precision figures with Adam (K = 12): DDP 16Φ, P_os 4Φ + 12Φ/N,
    P_os+g 2Φ + 14Φ/N. fp32 (no separate master needed): DDP 16Φ (params, grads, two Adam states);
    stages 1-2: 4Φ + 12Φ/N (the parameters, and 1/N of the gradients and of Adam's two states); stage 3 and
    FSDP2: 16Φ/N in both (everything partitioned; the persistent small parameters come on top).
    """
    stage = {"ddp": 0, "zero1": 1, "zero2": 2, "ds1": 1, "ds2": 2, "zero3": 3, "fsdp2": 3, "ds3": 3}.get(name)
    if stage is None:
        return None
    if dname == "bf16":
        return {0: 16.0, 1: 4.0 + 12.0 / n, 2: 2.0 + 14.0 / n, 3: 16.0 / n}[stage] * numel
    return {0: 16.0, 1: 4.0 + 12.0 / n, 2: 4.0 + 12.0 / n, 3: 16.0 / n}[stage] * numel


def report(results: list[dict[str, Any]], args: argparse.Namespace, modes: list[str]) -> dict[str, Any]:
    r0 = results[0]
    n = args.world
    t_ddp = r0["time"]["ddp"]
    print(
        f"\nTiny GPT {args.layers} layers, d {args.d_model}, vocab {args.vocab}, seq {args.seq}, "
        f"batch {args.batch}/rank, {n} gloo ranks x {args.threads} thread(s), reduce_bucket_size {args.bucket}"
    )
    print(f"\nstep time (median of {args.steps}, fp32, rank 0)")
    print(f"{'mode':<10} {'s/step':>8} {'x DDP':>7}")
    for name in modes:
        t = r0["time"][name]
        print(f"{name:<10} {t:8.3f} {t / t_ddp:7.2f}")
    print("\nper-rank memory (MiB; model state = params + grads + fp32 master + optimizer states;")
    print("formula: bf16 the ZeRO paper's mixed precision, fp32 16Φ for DDP and 4Φ + 12Φ/N for stages 1-2)")
    print(f"{'dtype/mode':<12} {'model state':>11} {'formula':>8} {'/formula':>8} {'peak RSS +':>11} {'RSS/form.':>9}")
    rows = {}
    for key, m in r0["memory"].items():
        dname, name = key.split("/")
        paper = _formula(dname, name, m["numel"], n)
        ms, rss = m["model_state_bytes"], max(r["memory"][key]["peak_rss_delta_bytes"] for r in results)
        rows[key] = {**m, "peak_rss_delta_bytes_max_rank": rss, "formula_bytes": paper}
        mib = 2.0**20
        p_s = f"{paper / mib:8.1f}" if paper else f"{'-':>8}"
        ratio = f"{ms / paper:8.2f}" if paper and ms > 0 else f"{'-':>8}"
        rratio = f"{rss / paper:9.2f}" if paper else f"{'-':>9}"
        ms_s = f"{ms / mib:11.1f}" if ms > 0 else f"{'-':>11}"
        print(f"{key:<12} {ms_s} {p_s} {ratio} {rss / mib:11.1f} {rratio}")
    print(
        f"\ngloo bus bandwidth, {args.probe_numel / 1e6:.0f}M fp32 (GB/s):",
        ", ".join(f"{k} {v:.2f}" for k, v in r0["collectives"].items()),
    )
    if "ds1" in modes:
        for s in (1, 2, 3):
            print(f"zero{s} / DeepSpeed stage {s} step time: {r0['time'][f'zero{s}'] / r0['time'][f'ds{s}']:.2f}")
    return {
        "time_s": r0["time"],
        "time_vs_ddp": {k: v / t_ddp for k, v in r0["time"].items()},
        "memory": rows,
        "collectives_busbw_GBps": r0["collectives"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model and few steps (under a minute)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    ap.add_argument("--bucket", type=float, default=5e6, help="reduce_bucket_size (elements)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    q = args.quick
    args.layers = args.layers or (2 if q else 8)
    args.d_model = args.d_model or (128 if q else 512)
    args.vocab = args.vocab or (1024 if q else 8192)
    args.seq = 64 if q and args.seq == 128 else args.seq
    args.steps = args.steps or (3 if q else 6)
    args.bucket = int(args.bucket if not q else min(args.bucket, 1e5))
    args.probe_numel = 1 << (20 if q else 24)
    modes = ["ddp", "zero1", "zero2", "zero2-rs", "zero3", "zero3-noprefetch", "fsdp2"]
    try:
        import deepspeed  # noqa: F401

        modes += ["ds1", "ds2", "ds3"]
    except ImportError:
        print("deepspeed is not importable here: DeepSpeed rows skipped")
    t0 = time.time()
    results = run(args, modes)
    figures = report(results, args, modes)
    meta = {
        "benchmark": "zero_step",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "params": results[0]["memory"]["fp32/zero1"]["numel"],
        "wall_s": round(time.time() - t0, 1),
        **figures,
    }
    print(f"\n{meta['params'] / 1e6:.1f}M parameters, {meta['wall_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))


if __name__ == "__main__":
    main()
