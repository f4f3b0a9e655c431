"""Launch-to-first-collective latency: ds-launch vs torchrun, 2 local workers, same run.

Each launch starts 2 gloo workers that init the process group, do one all_reduce and
write the wall-clock time at which it completed. Latency = (last rank's first-collective
time) - (time just before the launcher process was started). Launchers alternate, so
machine noise hits both equally; the table reports medians and the ratio (goal <= 1.2x).

    python benchmarks/launch_latency.py [--quick] [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = """
import os, sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
done = time.time()
out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
with open(os.path.join(out, f"rank{dist.get_rank()}"), "w") as f:
    f.write(repr(done))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _command(launcher: str, script: Path, out: Path) -> list[str]:
    port = str(_free_port())
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            str(script),
            str(out),
        ]
    return [sys.executable, "-m", "ds_launch", "--num_gpus", "2", "--master_port", port, str(script), str(out)]


def _one(launcher: str, script: Path, tmp: Path) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(dir=tmp))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.time()
    proc = subprocess.run(_command(launcher, script, out), env=env, capture_output=True, text=True, timeout=300)
    end = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"{launcher} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    first = max(float((out / f"rank{r}").read_text()) for r in (0, 1))
    return first - start, end - start


def main() -> None:
    """Run the comparison, print the table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 launches each (under a minute)")
    p.add_argument("--repeats", type=int, default=None, help="launches per launcher (default 10, 3 with --quick)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args()
    repeats = args.repeats or (3 if args.quick else 10)
    with tempfile.TemporaryDirectory(prefix="launch-bench-") as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "worker.py"
        script.write_text(WORKER)
        _one("torchrun", script, tmp)  # warm the page cache for both (same interpreter, same torch)
        samples: dict[str, list[tuple[float, float]]] = {"torchrun": [], "ds-launch": []}
        for _ in range(repeats):
            for launcher in samples:
                samples[launcher].append(_one(launcher, script, tmp))
    rows = {}
    for launcher, runs in samples.items():
        rows[launcher] = {
            "first_collective_s": statistics.median(r[0] for r in runs),
            "total_s": statistics.median(r[1] for r in runs),
            "first_collective_all_s": [round(r[0], 3) for r in runs],
        }
    ratio = rows["ds-launch"]["first_collective_s"] / rows["torchrun"]["first_collective_s"]
    ratio_total = rows["ds-launch"]["total_s"] / rows["torchrun"]["total_s"]
    print(f"launch-to-first-collective, 2 local gloo workers, median of {repeats} (alternating)")
    print(f"{'launcher':<12}{'first collective (s)':>22}{'launch to exit (s)':>20}")
    for launcher, row in rows.items():
        print(f"{launcher:<12}{row['first_collective_s']:>22.3f}{row['total_s']:>20.3f}")
    print(f"{'ratio':<12}{ratio:>21.2f}x{ratio_total:>19.2f}x   (goal <= 1.2x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "benchmark": "launch_latency",
            "repeats": repeats,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} CPUs",
            "results": rows,
            "ratio_first_collective": ratio,
            "ratio_total": ratio_total,
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
