"""CPUAdam on 4 KiB pages against the same on transparent huge pages, in one process.

Two copies of the same problem: params, grads and moments from torch's allocator (4 KiB pages
where THP is in ``madvise`` mode) and from ``ds_native.memory`` (huge pages). Steps alternate
between the two; the ratio is the median over rounds of the paired times.

    python benchmarks/huge_pages.py [--quick] [--sizes 10e6 50e6 200e6] [--threads 1 2] [--steps 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ds_native import memory
from ds_native.optim import CPUAdam


def _problem(n: int, huge: bool) -> tuple[CPUAdam, list[torch.Tensor]]:
    """An fp32 CPUAdam over one n-element param whose four streams are all on huge pages, or none."""
    alloc = memory.empty_huge if huge else torch.empty
    p = torch.nn.Parameter(alloc(n).normal_(0.0, 0.1))
    p.grad = alloc(n).normal_(0.0, 1e-3)
    opt = CPUAdam([p], lr=1e-4, weight_decay=0.01)
    opt.step()
    state = opt.state[p]
    if not huge:  # CPUAdam puts its moments on huge pages; this copy must not have them
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros(n), torch.zeros(n)
    return opt, [p.detach(), p.grad, state["exp_avg"], state["exp_avg_sq"]]


def run(sizes: list[int], thread_counts: list[int], steps: int) -> list[dict]:
    rows = []
    for n in sizes:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            small, small_bufs = _problem(n, huge=False)
            big, big_bufs = _problem(n, huge=True)
            times: dict[str, list[float]] = {"4k": [], "huge": []}
            for r in range(steps):
                order = [("4k", small), ("huge", big)]
                for name, opt in order if r % 2 else order[::-1]:
                    t0 = time.perf_counter()
                    opt.step()
                    times[name].append(time.perf_counter() - t0)
            rows.append(
                {
                    "params": n,
                    "threads": threads,
                    "gparams_per_s_4k": n / statistics.median(times["4k"]) / 1e9,
                    "gparams_per_s_huge": n / statistics.median(times["huge"]) / 1e9,
                    "speedup": statistics.median(a / b for a, b in zip(times["4k"], times["huge"], strict=True)),
                    "huge_pct_4k_copy": 100.0 * memory.huge_page_share(small_bufs),
                    "huge_pct_huge_copy": 100.0 * memory.huge_page_share(big_bufs),
                }
            )
            r = rows[-1]
            print(
                f"{n / 1e6:>5.0f}M {threads} thr  4 KiB {r['gparams_per_s_4k']:.3f}  huge {r['gparams_per_s_huge']:.3f}"
                f" Gparam/s  huge/4K {r['speedup']:.2f}x  (on huge pages: {r['huge_pct_4k_copy']:.0f}% /"
                f" {r['huge_pct_huge_copy']:.0f}%)",
                flush=True,
            )
            del small, big, small_bufs, big_bufs
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10M and 50M params, 10 steps")
    parser.add_argument("--sizes", type=float, nargs="+", help="parameter counts (default 10e6 50e6 200e6)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, help="paired steps per case (default 30; quick 10)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    sizes = args.sizes or ([10e6, 50e6] if args.quick else [10e6, 50e6, 200e6])
    steps = args.steps or (10 if args.quick else 30)
    print(f"transparent huge pages: {memory.thp_mode()}, {memory.huge_page_bytes() >> 20} MiB")
    rows = run([int(s) for s in sizes], args.threads, steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"thp_mode": memory.thp_mode(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
