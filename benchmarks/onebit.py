"""onebit-comm's compressed all-reduce against torch's fp32 all-reduce, and 1-bit Adam's step time.

In one run, 2 gloo ranks on CPU, one intra-op thread per rank:

- per tensor size (1M, 4M, 16M, 64M elements; --quick: 1M, 4M): bytes each rank sends and wall time
  of ``onebit_comm.compressed_allreduce`` against ``dist.all_reduce`` of the same fp32 tensor.
  Compressed bytes are counted by the collective itself (``CommStats``); fp32 bytes are the
  bandwidth-optimal ring figure ``2 (W-1)/W * 4n`` (gloo's own algorithm sends at least that).
  Times: the median of ``--reps`` calls, the collectives interleaved so that machine noise falls
  on all of them. The compressed call is timed three ways: as it runs by default (ds-native's fused
  CPU kernels, error buffers exact after each call), with deferred error updates (``pending=``, as
  the 1-bit optimizers call it: one memory pass less over each error buffer, bitwise the same
  result) and with ``fused=False`` (the same arithmetic in torch ops, bitwise the same result).
  Beside wall time, each call's CPU time (``time.process_time``: this rank's threads, gloo's
  included), which time spent descheduled or waiting for the other rank does not inflate: on a
  shared machine the wall figures mostly measure the other jobs.
- end to end: a tiny GPT trained through ``zero_all.initialize`` (ZeRO stage 0, fp32) with
  ``"OneBitAdam"`` (in its compression phase: ``freeze_step`` 2, timed after it) against ``"AdamW"``
  (the engine's plain all-reduce), the median optimizer-step wall time (forward + backward + step).

``--profile`` instead times each fused kernel alone (one process, one thread, 16M elements, as one
rank of two sees them) beside torch's copy / sum / add over the same bytes, with the bytes each
kernel moves: what each pass costs against the machine's memory bandwidth.

``--json PATH`` writes ``{"sizes": {n: {"bytes_ratio_vs_fp32", "time_ratio_vs_allreduce",
"time_ratio_deferred_vs_allreduce", "cpu_time_ratio_vs_allreduce", ...}}, "step_time_vs_adamw", "meta"}``.

    python benchmarks/onebit.py [--quick] [--json PATH] [--reps 5] [--steps 20] [--sizes 16M,64M] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

# This folder holds benchmarks named after packages: keep it off the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from onebit_comm import (  # noqa: E402
    CommStats,
    PendingErrors,
    compressed_allreduce,
    error_buffers,
    fp32_allreduce_bytes,
)

WORLD = 2


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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        return nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all its threads: gloo's included) of one collective call."""
    dist.barrier()
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - w0, time.process_time() - c0


def _collectives(rank: int, sizes: list[int], reps: int) -> dict[int, dict[str, Any]]:
    out = {}
    for n in sizes:
        x = torch.randn(n, generator=torch.Generator().manual_seed(rank))
        we, se = error_buffers(n, WORLD)
        we_t, se_t = error_buffers(n, WORLD)
        we_d, se_d = error_buffers(n, WORLD)
        pending = PendingErrors()
        stats = CommStats()
        runs: dict[str, list[tuple[float, float]]] = {
            "fp32": [],
            "onebit": [],
            "onebit_deferred": [],
            "onebit_torch_path": [],
        }
        for i in range(reps + 1):  # the first call of each warms up (allocations, gloo connections)
            a, b, c, d = x.clone(), x.clone(), x.clone(), x.clone()
            got = {
                "fp32": _timed(dist.all_reduce, a),
                "onebit": _timed(compressed_allreduce, b, we, se, stats=stats),
                "onebit_deferred": _timed(compressed_allreduce, d, we_d, se_d, pending=pending),
                # the same arithmetic in torch ops (bitwise the same result)
                "onebit_torch_path": _timed(compressed_allreduce, c, we_t, se_t, fused=False),
            }
            if i:
                for k, v in got.items():
                    runs[k].append(v)
        out[n] = {"fp32_bytes": fp32_allreduce_bytes(n, WORLD), "onebit_bytes": stats.bytes_sent / stats.calls}
        for k, v in runs.items():
            out[n][f"{k}_s"] = statistics.median(t for t, _ in v)
            out[n][f"{k}_cpu_s"] = statistics.median(c for _, c in v)
    return out


def _steps(rank: int, args: argparse.Namespace) -> dict[str, float]:
    import zero_all

    times: dict[str, list[float]] = {}
    engines = {}
    for name, opt in (
        ("AdamW", {"type": "AdamW", "params": {"lr": 1e-4}}),
        ("OneBitAdam", {"type": "OneBitAdam", "params": {"lr": 1e-4, "freeze_step": 2}}),
    ):
        torch.manual_seed(0)
        model = TinyGPT(args.layers, args.d_model, 256, 64)
        cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": opt, "zero_optimization": {"stage": 0}}
        engines[name], *_ = zero_all.initialize(model=model, config=cfg)
        times[name] = []
    for step in range(args.steps + 3):  # round robin: noise falls on both; 3 untimed (warm-up + freeze)
        g = torch.Generator().manual_seed(step * WORLD + rank)
        seq = torch.randint(0, 256, (4, 65), generator=g)
        for name, engine in engines.items():
            dist.barrier()
            t0 = time.perf_counter()
            loss = engine(seq[:, :-1], seq[:, 1:])
            engine.backward(loss)
            engine.step()
            if step >= 3:
                times[name].append(time.perf_counter() - t0)
    numel = sum(p.numel() for p in engines["AdamW"].module.parameters())
    return {"numel": numel, **{k: statistics.median(v) for k, v in times.items()}}


def _rank_main(rank: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res = {"collectives": _collectives(rank, args.sizes, args.reps), "steps": _steps(rank, args)}
        if rank == 0:
            queue.put(res)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, args, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs) or queue.empty():
        raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    return queue.get()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    print(f"compressed_allreduce vs dist.all_reduce (fp32), {WORLD} gloo ranks, median of {args.reps}")
    print(
        f"{'elements':>10} {'fp32 MB':>8} {'1-bit MB':>8} {'bytes':>6} {'fp32 ms':>8} {'1-bit ms':>8} {'ratio':>6} "
        f"{'deferred':>8} {'ratio':>6} {'torch-ops':>9} {'ratio':>6} | {'CPU ms: fp32':>12} {'1-bit':>6} {'ratio':>6} "
        f"{'deferred':>8} {'ratio':>6}"
    )
    sizes = {}
    for n, c in res["collectives"].items():
        br, tr = c["onebit_bytes"] / c["fp32_bytes"], c["onebit_s"] / c["fp32_s"]
        td, tt = c["onebit_deferred_s"] / c["fp32_s"], c["onebit_torch_path_s"] / c["fp32_s"]
        cr, cd = c["onebit_cpu_s"] / c["fp32_cpu_s"], c["onebit_deferred_cpu_s"] / c["fp32_cpu_s"]
        sizes[str(n)] = {
            "bytes_ratio_vs_fp32": br,
            "time_ratio_vs_allreduce": tr,
            "time_ratio_deferred_vs_allreduce": td,
            "time_ratio_torch_path_vs_allreduce": tt,
            "cpu_time_ratio_vs_allreduce": cr,
            "cpu_time_ratio_deferred_vs_allreduce": cd,
            **c,
        }
        print(
            f"{n:>10} {c['fp32_bytes'] / 1e6:>8.2f} {c['onebit_bytes'] / 1e6:>8.3f} {br:>6.4f} "
            f"{c['fp32_s'] * 1e3:>8.2f} {c['onebit_s'] * 1e3:>8.2f} {tr:>6.3f} "
            f"{c['onebit_deferred_s'] * 1e3:>8.2f} {td:>6.3f} "
            f"{c['onebit_torch_path_s'] * 1e3:>9.2f} {tt:>6.3f} | {c['fp32_cpu_s'] * 1e3:>12.2f} "
            f"{c['onebit_cpu_s'] * 1e3:>6.2f} {cr:>6.3f} {c['onebit_deferred_cpu_s'] * 1e3:>8.2f} {cd:>6.3f}"
        )
    st = res["steps"]
    ratio = st["OneBitAdam"] / st["AdamW"]
    print(
        f"tiny GPT ({st['numel']:,} params, engine stage 0, fp32): step AdamW {st['AdamW'] * 1e3:.1f} ms, "
        f"OneBitAdam (compressed phase) {st['OneBitAdam'] * 1e3:.1f} ms, ratio {ratio:.3f}"
    )
    return {
        "sizes": sizes,
        "step_time_vs_adamw": ratio,
        "steps": st,
        "meta": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.machine()}",
            "torch": torch.__version__,
            "world_size": WORLD,
            "backend": "gloo",
            "quick": args.quick,
            "command": " ".join(sys.argv),
            "load_average": os.getloadavg(),
        },
    }


def profile_kernels(n: int = 1 << 24, reps: int = 9) -> None:
    """Per-kernel times, one process, one thread: rank 0's view of a 2-rank call on ``n`` fp32 elements."""
    from ds_native import onebit as k

    torch.set_num_threads(1)
    c = n // WORLD
    g = torch.Generator().manual_seed(0)
    x, src, dst, out = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.empty(n), torch.empty(n)
    err, se = torch.randn(n, generator=g) * 0.1, torch.randn(c, generator=g) * 0.1
    bits = torch.randint(0, 256, (WORLD, c // 8 + 4), dtype=torch.uint8, generator=g)
    mine = torch.empty(1, c // 8 + 4, dtype=torch.uint8)
    sc, w8, valid = [0.1] * WORLD, [0.05] * WORLD, [c] * WORLD
    mb = n * 4 / 1e6  # one fp32 pass over the tensor
    rows: list[tuple[str, float, Any]] = [
        ("torch dst.copy_(src)", 3 * mb, lambda: dst.copy_(src)),
        ("torch src.sum()", mb, lambda: src.sum()),
        ("torch dst.add_(src)", 3 * mb, lambda: dst.add_(src)),
        ("worker compensate_ (err += x, sums)", 3 * mb, lambda: k.compensate_(x, err, WORLD)),
        ("worker pack_ (signs, err update)", 2 * mb, lambda: k.pack_(err, WORLD, bits, sc, valid)),
        ("worker compress_deferred_ (one pass)", 3 * mb, lambda: k.compress_deferred_(x, err, WORLD, bits, sc, valid)),
        ("server server_accumulate_ (old pass 1)", mb, lambda: k.server_accumulate_(bits, w8, se, c)),
        ("server pack_ (old pass 2)", mb, lambda: k.pack_(se, 1, mine, [0.1], [c])),
        ("server server_sum_squares (read-only)", mb / 2, lambda: k.server_sum_squares(bits, w8, se, c)),
        ("server server_pack_", mb, lambda: k.server_pack_(bits, w8, se, c, mine, 0.1)),
        ("server server_deferred_ (one pass)", mb, lambda: k.server_deferred_(bits, w8, se, c, mine, 0.1)),
        ("decode (streaming stores)", mb, lambda: k.decode(bits, sc, c, out)),
    ]
    best = {name: float("inf") for name, _, _ in rows}
    for _ in range(reps):  # interleaved, best of reps: the other jobs' noise falls on every row
        for name, _, fn in rows:
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    print(
        f"one process, 1 thread, {n:,} fp32 elements ({WORLD} chunks of {c:,}), best of {reps}; load {os.getloadavg()}"
    )
    print(f"{'kernel':<42} {'MB moved':>9} {'ms':>7} {'GB/s':>6}")
    for name, moved, _ in rows:
        print(f"{name:<42} {moved:>9.0f} {best[name] * 1e3:>7.2f} {moved / 1e3 / best[name]:>6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M and 4M elements, a smaller model (under a minute)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--reps", type=int, default=None, help="calls timed per size (default 5; 3 with --quick)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--profile", action="store_true", help="time each fused kernel alone (one process) and exit")
    ap.add_argument("--sizes", help="comma-separated element counts, M = 2**20 (e.g. 16M,64M); default per --quick")
    args = ap.parse_args()
    if args.profile:
        profile_kernels()
        return
    if args.sizes:
        args.sizes = [
            int(float(x[:-1]) * (1 << 20)) if x.upper().endswith("M") else int(x) for x in args.sizes.split(",")
        ]
    else:
        args.sizes = [1 << 20, 1 << 22] if args.quick else [1 << 20, 1 << 22, 1 << 24, 1 << 26]
    if args.quick:
        args.steps, args.layers, args.d_model = min(args.steps, 8), 2, 128
    if args.reps is None:
        args.reps = 3 if args.quick else 5
    out = report(run(args), args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
