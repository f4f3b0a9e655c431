"""amp-scaler: fused unscale + overflow check + grad-norm + clip vs torch.amp.GradScaler + clip_grad_norm_.

Both sides start from the same scaled fp32 gradients (1,000 tensors, 25M elements in total,
sizes drawn log-uniformly) and end with unscaled, clipped gradients, an overflow decision and
the global norm as a Python float (what a training loop logs):

* ours:  ``amp_scaler.unscale_and_clip_(grads, 1/scale, max_norm)``
* torch: ``GradScaler.unscale_(opt)`` + ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` + ``float(norm)``

The gradients are restored before every repetition (outside the timer), the two sides are
interleaved, and the median is reported. The goal is ours/torch <= 1.0.

    python benchmarks/amp_scaler.py [--quick] [--json PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# This file is named like the package it measures: drop its own folder from the import path
# so that `import amp_scaler` finds the package, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from amp_scaler import unscale_and_clip_  # noqa: E402

SCALE = 2.0**16
MAX_NORM = 1.0


def make_grads(n_tensors: int, n_elements: int, device: torch.device) -> list[torch.nn.Parameter]:
    """``n_tensors`` parameters with scaled gradients, ``n_elements`` elements in total."""
    g = torch.Generator().manual_seed(0)
    weights = torch.exp(torch.rand(n_tensors, generator=g) * 6)  # sizes spread over ~400x
    sizes = (weights / weights.sum() * n_elements).long().clamp(min=1)
    sizes[0] += n_elements - int(sizes.sum())
    params = []
    for n in sizes.tolist():
        p = torch.nn.Parameter(torch.empty(n, device=device))
        p.grad = torch.randn(n, device=device) * SCALE
        params.append(p)
    return params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(params: list[torch.nn.Parameter]) -> float:
    norm, _found_inf = unscale_and_clip_([p.grad for p in params], 1.0 / SCALE, MAX_NORM)
    return norm


def run_torch(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, device: torch.device) -> float:
    scaler = torch.amp.GradScaler(device.type, init_scale=SCALE)
    scaler.scale(torch.ones((), device=device))  # GradScaler wants scale() before unscale_()
    scaler.unscale_(opt)
    return float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM))


def bench(n_tensors: int, n_elements: int, reps: int, device: torch.device) -> dict:
    params = make_grads(n_tensors, n_elements, device)
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    opt = torch.optim.SGD(params, lr=0.1)
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    norms: dict[str, float] = {}
    for rep in range(reps + 1):  # rep 0 warms up both
        for name in ("torch", "ours"):
            torch._foreach_copy_(grads, saved)
            sync(device)
            t0 = time.perf_counter()
            norm = run_ours(params) if name == "ours" else run_torch(params, opt, device)
            sync(device)
            if rep > 0:
                times[name].append(time.perf_counter() - t0)
            norms[name] = norm
    ours, ref = statistics.median(times["ours"]), statistics.median(times["torch"])
    rel = abs(norms["ours"] - norms["torch"]) / norms["torch"]
    if rel > 1e-5:
        raise SystemExit(f"norms disagree: ours {norms['ours']} torch {norms['torch']}")
    return {
        "case": f"{n_tensors} tensors, {n_elements / 1e6:g}M fp32 elements, {device.type}",
        "n_tensors": n_tensors,
        "n_elements": n_elements,
        "device": device.type,
        "reps": reps,
        "ours_ms": ours * 1e3,
        "torch_ms": ref * 1e3,
        "ratio": ours / ref,
        # Ours moves 12 bytes per element: a read pass (norm) and a read+write pass (scale).
        "ours_GBps": 12 * n_elements / ours / 1e9,
        "norm_rel_diff": rel,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5 quick, 30 full)")
    args = ap.parse_args()
    device = torch.device(args.device)
    reps = args.reps or (5 if args.quick else 30)
    cases = [(1000, 25_000_000)]
    if not args.quick:
        cases.append((100, 25_000_000))
    rows = [bench(n, e, reps, device) for n, e in cases]
    print("| case | ours (ms) | torch GradScaler.unscale_ + clip_grad_norm_ (ms) | ours/torch |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['case']} | {r['ours_ms']:.1f} | {r['torch_ms']:.1f} | {r['ratio']:.2f} |")
    meta = {
        "benchmark": "amp_scaler",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "goal": "ratio <= 1.0",
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=2)


if __name__ == "__main__":
    main()
