"""act-ckpt: saved-activation memory and step time of each checkpointing mode, side by side.

A GPT-style stack (12 blocks, d_model 512, seq 512, batch 4, 8 heads, dropout 0.1, unfused
attention as in Megatron) on CPU, one forward+backward per step, for:

  none               no checkpointing (the reference)
  full               every block checkpointed (only block inputs kept)
  sel-matmul         selective: save matmul outputs, recompute the rest; dropout masks replayed
                     (random_ops="replay", the default for selective policies on CPU)
  sel-core           selective: recompute the attention core (and pointwise ops), save the rest;
                     dropout masks replayed
  sel-matmul-redraw  sel-matmul with random_ops="recompute": dropout redrawn in the recompute
  sel-core-redraw    sel-core with random_ops="recompute"
  cpu                full + cpu_checkpointing (on a CPU-only machine the inputs are already in host
                     memory: nothing moves, the row shows the bookkeeping cost)
  partitioned        full + partition_activations over a 2-rank gloo group (2 processes; per rank)

"Saved MiB" is what the graph holds for backward at the end of the forward (the peak between
forward and backward), counted with saved-tensor hooks per storage, parameters excluded
(act_ckpt.SavedActivationMeter; replayed dropout masks included). Steps are taken round-robin over
the modes, the order rotated every round, all in one process. "step s" is a mode's median step
time; "vs none" is the median over rounds of (mode's step / none's step in the same round), which
cancels load drift on a shared machine; "range" is the lowest and highest of those per-round ratios.

    python benchmarks/act_ckpt.py [--quick] [--json PATH] [--steps N] [--layers N] [--threads N] [--modes a,b]
        [--no-partitioned]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

# This file is named like the package it measures: keep its folder off the import path, so
# `import act_ckpt` finds the package and not this script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import act_ckpt  # noqa: E402

FULL = {"layers": 12, "d": 512, "heads": 8, "seq": 512, "batch": 4, "vocab": 8192, "steps": 5, "warmup": 1}
QUICK = {"layers": 2, "d": 128, "heads": 4, "seq": 128, "batch": 2, "vocab": 1024, "steps": 2, "warmup": 1}


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, p: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.attn_drop = nn.Dropout(p)
        self.resid_drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        with act_ckpt.attention_core():
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            att = self.attn_drop(scores.masked_fill(mask, float("-inf")).softmax(-1))
            y = att @ v
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, s, d)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, p: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, p)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(p))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, seq: int, vocab: int, p: float = 0.1) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.drop = nn.Dropout(p)
        self.blocks = nn.ModuleList(Block(d, heads, p) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.ones(seq, seq, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        x = self.drop(self.tok(ids) + self.pos(torch.arange(s, device=ids.device)))
        for block in self.blocks:
            x = block(x, self.mask[:s, :s])
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


MODES = {
    "none": None,
    "full": {},
    "sel-matmul": {"policy": "save_matmuls"},
    "sel-core": {"policy": "recompute_attention_core"},
    "sel-matmul-redraw": {"policy": "save_matmuls", "random_ops": "recompute"},
    "sel-core-redraw": {"policy": "recompute_attention_core", "random_ops": "recompute"},
    "cpu": {"cpu_checkpointing": True},
}


def _model(size: dict, mode: dict | None, group=None) -> GPT:
    torch.manual_seed(0)
    model = GPT(size["layers"], size["d"], size["heads"], size["seq"], size["vocab"])
    if mode is not None:
        opts = dict(mode)
        if group is not None:
            opts["partition_group"] = group
        act_ckpt.apply_activation_checkpointing(model, **opts)
    return model


def _step(model: GPT, ids: torch.Tensor) -> tuple[float, object]:
    """One forward+backward; returns its time and the bytes held between forward and backward."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with act_ckpt.SavedActivationMeter(model.parameters()) as meter:
        loss = model(ids)
    held = meter.live()
    loss.backward()
    dt = time.perf_counter() - t0
    assert meter.live().total == 0, "saved tensors outlived the backward"
    return dt, held


def _measure(models: dict[str, GPT], size: dict, ref: str) -> dict[str, dict]:
    """Steps round-robin over the models, the order rotated every round, so that load drift on a
    shared machine and the position in a round hit every mode alike; ratios are against ``ref``."""
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=torch.Generator().manual_seed(1))
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    saved = {}
    for step in range(size["warmup"] + size["steps"]):
        k = step % len(names)
        for name in names[k:] + names[:k]:
            dt, saved[name] = _step(models[name], ids)
            if step >= size["warmup"]:
                times[name].append(dt)
    rows = {}
    for name in names:
        ratios = sorted(t / r for t, r in zip(times[name], times[ref], strict=True))
        rows[name] = {
            "saved_bytes": saved[name].total,
            "offloaded_bytes": saved[name].offloaded,
            "step_s": statistics.median(times[name]),
            "step_times_s": times[name],
            "ratio": statistics.median(ratios),
            "ratio_range": [ratios[0], ratios[-1]],
        }
    return rows


def _partitioned_rank(rank: int, world: int, size: dict) -> dict:
    import torch.distributed as dist

    torch.set_num_threads(1)
    group = dist.new_group(list(range(world)))
    models = {"full-1thread": _model(size, {}), "partitioned": _model(size, {}, group)}
    return _measure(models, size, "full-1thread")


def _run_partitioned(size: dict) -> dict | None:
    try:
        from zero_testkit import run_distributed
    except ImportError:
        print("(partitioned row skipped: zero-testkit is not installed)", file=sys.stderr)
        return None
    return run_distributed(_partitioned_rank, 2, size, timeout=600)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced size, well under a minute")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--steps", type=int, help="measured steps per mode")
    ap.add_argument("--layers", type=int, help="override the number of blocks")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--modes", help=f"comma-separated subset/order of {','.join(MODES)} (none is always measured)")
    ap.add_argument("--no-partitioned", action="store_true", help="skip the 2-process partitioned row")
    args = ap.parse_args()
    size = dict(QUICK if args.quick else FULL)
    if args.steps:
        size["steps"] = args.steps
    if args.layers:
        size["layers"] = args.layers

    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(MODES) if not args.modes else args.modes.split(",")
    unknown = [n for n in names if n not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    if "none" not in names:
        names.insert(0, "none")
    rows = _measure({name: _model(size, MODES[name]) for name in names}, size, "none")
    part = None if args.no_partitioned else _run_partitioned(size)

    base = rows["none"]
    print(
        f"\nact-ckpt  layers={size['layers']} d_model={size['d']} heads={size['heads']} seq={size['seq']} "
        f"batch={size['batch']}  torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print(f"{size['steps']} measured rounds; step s = median, time vs none = median of per-round ratios (range)\n")
    print(f"| mode | saved MiB | vs none | offloaded MiB | step s | vs none | range |\n|{'---|' * 7}")

    def line(name: str, r: dict, ref: dict) -> None:
        lo, hi = r["ratio_range"]
        print(
            f"| {name} | {r['saved_bytes'] / 2**20:.1f} | {r['saved_bytes'] / ref['saved_bytes']:.2f} | "
            f"{r['offloaded_bytes'] / 2**20:.1f} | {r['step_s']:.3f} | {r['ratio']:.2f} | {lo:.2f}–{hi:.2f} |"
        )

    for name, r in rows.items():
        line(name, r, base)
    if part is not None:
        # Partitioned rows come from 2 single-threaded processes: their time ratios are against
        # the 2-rank full row of the same run, their memory against none.
        line("full (2 ranks, per rank)", part["full-1thread"], base)
        line("partitioned (2 ranks, per rank)", part["partitioned"], base)
        ratio = part["partitioned"]["saved_bytes"] / part["full-1thread"]["saved_bytes"]
        print(f"\npartitioned / full per rank: saved {ratio:.2f}x; time vs 2-rank full is the rows' 'vs none'")

    if args.json:
        result = {
            "benchmark": "act_ckpt",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
            "size": size,
            "modes": rows,
            "partitioned": part,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
