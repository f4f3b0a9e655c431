"""Optimizer offload none / cpu / nvme, side by side in one run: step time and how much NVMe IO is hidden.

The tiny GPT of benchmarks/zero_step.py (imported, not copied) trains in one process on CPU with
ZeroShardedOptimizer stage 2 and ds-native's CPU Adam, bf16 by default. Modes:

  none         no offload: fp32 master partition and moments in memory; the step upcasts the 16-bit
               gradients, runs CPU Adam, then casts the master into the model (three passes)
  cpu          offload_optimizer cpu: the same state in host memory, stepped by CPU Adam with the 16-bit
               gradients read and the 16-bit parameters written in the same pass (one pass)
  nvme         offload_optimizer nvme: master + moments in swap files under --nvme-path, swept in pieces
               of --sub-group elements with the next piece's read and the last one's write-back in flight
  nvme-serial  the same with the IO not overlapped (each read waited for before the update, each write
               after it): the reference for how much of the IO the pipelined sweep hides

Step time is the median over round-robin steps (each mode steps in turn, so noise from other processes
falls on all of them alike). ``io_hidden_fraction`` = 1 − (time the pipelined sweep is blocked on IO) /
(time the serial sweep is blocked on IO, i.e. all of its IO time): the share of the swap IO that ran
behind the optimizer's compute. ``io_hidden_fraction_by_step_time`` = 1 − (nvme − cpu) / (nvme-serial − cpu)
says the same from whole step times (clipped to [0, 1]); where the IO threads and CPU Adam share too few
cores the two differ: the waiting is hidden, the CPU time the IO costs is not.
With the ThreadPool IO fallback the swap files go through the page cache; with ``ds_native.aio`` (O_DIRECT)
they reach the disk.

    python benchmarks/offload_step.py [--quick] [--json PATH] [--layers 8] [--d-model 512] [--steps 6]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# This folder holds benchmarks named after packages (benchmarks/amp_scaler.py): keep it off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from zero_shard import ZeroConfig, ZeroShardedOptimizer, default_optimizer_factory  # noqa: E402


def _zero_step() -> Any:
    """benchmarks/zero_step.py as a module (its TinyGPT and batches), without putting benchmarks/ on the path."""
    spec = importlib.util.spec_from_file_location("_zero_step_bench", os.path.join(_HERE, "zero_step.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MODES = ("none", "cpu", "nvme", "nvme-serial")


class Mode:
    """One model + optimizer configured for an offload mode."""

    def __init__(self, name: str, args: argparse.Namespace, zs: Any, dtype: torch.dtype, nvme_dir: str) -> None:
        torch.manual_seed(0)
        self.name = name
        self.model = zs.TinyGPT(args.layers, args.d_model, args.vocab, args.seq)
        self.numel = sum(p.numel() for p in self.model.parameters())
        zero: dict[str, Any] = {"stage": 2, "overlap_comm": True, "reduce_bucket_size": int(args.bucket)}
        if name == "cpu":
            zero["offload_optimizer"] = {"device": "cpu"}
        elif name.startswith("nvme"):
            zero["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme_dir, "buffer_count": 9}
            zero["sub_group_size"] = int(args.sub_group)
        self.opt = ZeroShardedOptimizer(
            list(self.model.named_parameters()),
            default_optimizer_factory(lr=1e-4),
            ZeroConfig.model_validate(zero),
            compute_dtype=dtype,
        )
        if name == "nvme-serial":
            self.opt.offload.nvme.overlap = False
        self.times: list[float] = []
        self.step_times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t0 = time.perf_counter()
        logits = self.model(x).float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.opt.backward(loss)
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        self.times.append(t2 - t0)
        self.step_times.append(t2 - t1)

    def stats(self) -> dict[str, Any]:
        off = self.opt.offload
        if off is None or off.nvme is None:
            return {}
        s = off.nvme.stats
        return {
            "bytes_read": s.bytes_read,
            "bytes_written": s.bytes_written,
            "read_wait_s": round(s.read_wait_s, 4),
            "write_wait_s": round(s.write_wait_s, 4),
            "io_backend": off.nvme.swapper.reader.backend,
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    zs = _zero_step()
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    nvme_dir = tempfile.mkdtemp(prefix="offload-bench-", dir=args.nvme_path)
    try:
        modes = [Mode(m, args, zs, dtype, nvme_dir) for m in MODES]
        for step in range(args.warmup + args.steps):
            x, y = zs._batch(args, 0, step)
            for m in modes:
                if step == args.warmup:
                    m.times.clear()
                    m.step_times.clear()
                    if m.opt.offload is not None and m.opt.offload.nvme is not None:
                        m.opt.offload.nvme.stats.reset()
                m.step(x, y)
        rows = {
            m.name: {
                "step_s": statistics.median(m.times),
                "optimizer_step_s": statistics.median(m.step_times),
                **m.stats(),
            }
            for m in modes
        }
        numel = modes[0].numel
        for m in modes:
            if m.opt.offload is not None:
                m.opt.offload.close()
    finally:
        shutil.rmtree(nvme_dir, ignore_errors=True)
    t = {k: v["step_s"] for k, v in rows.items()}
    serial_extra = t["nvme-serial"] - t["cpu"]
    # Undefined (None) when serial swapping did not measure slower than CPU offload (noise dominates).
    by_time = 1.0 - (t["nvme"] - t["cpu"]) / serial_extra if serial_extra > 0 else None

    def waited(name: str) -> float:
        return rows[name]["read_wait_s"] + rows[name]["write_wait_s"]

    hidden = 1.0 - waited("nvme") / waited("nvme-serial") if waited("nvme-serial") > 0 else 1.0
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": {"layers": args.layers, "d_model": args.d_model, "params": numel, "dtype": args.dtype},
        "sub_group_size": int(args.sub_group),
        "rows": rows,
        "time_vs_no_offload": {"cpu": t["cpu"] / t["none"], "nvme": t["nvme"] / t["none"]},
        "io_hidden_fraction": max(0.0, min(1.0, hidden)),
        "io_hidden_fraction_by_step_time": None if by_time is None else max(0.0, min(1.0, by_time)),
    }


def report(res: dict[str, Any]) -> None:
    m = res["model"]
    print(f"tiny GPT {m['layers']}x{m['d_model']} ({m['params'] / 1e6:.1f}M params, {m['dtype']}), stage 2, 1 process")
    print(f"{'mode':<12} {'step s':>9} {'opt.step s':>11} {'vs none':>8} {'read wait s':>12} {'write wait s':>13}")
    none = res["rows"]["none"]["step_s"]
    for name, r in res["rows"].items():
        print(
            f"{name:<12} {r['step_s']:>9.4f} {r['optimizer_step_s']:>11.4f} {r['step_s'] / none:>8.3f} "
            f"{r.get('read_wait_s', 0):>12.4f} {r.get('write_wait_s', 0):>13.4f}"
        )
    by_time = res["io_hidden_fraction_by_step_time"]
    print(
        f"io_hidden_fraction {res['io_hidden_fraction']:.2f} (blocked-on-IO time), "
        f"{'n/a' if by_time is None else f'{by_time:.2f}'} by step time"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model and few steps (under a minute)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bucket", type=float, default=5e6, help="reduce_bucket_size (elements)")
    ap.add_argument("--sub-group", type=float, default=None, help="sub_group_size for nvme (elements)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU Adam uses them too)")
    ap.add_argument("--nvme-path", default=None, help="directory for the swap files (default: the temp dir)")
    args = ap.parse_args()
    q = args.quick
    args.layers = args.layers or (2 if q else 8)
    args.d_model = args.d_model or (256 if q else 512)
    args.vocab = args.vocab or (2048 if q else 8192)
    args.steps = args.steps or (4 if q else 8)
    args.seq = 64 if q and args.seq == 128 else args.seq
    args.sub_group = args.sub_group or (2e5 if q else 2e6)
    res = run(args)
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
