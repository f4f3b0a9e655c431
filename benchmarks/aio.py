"""ds-native async IO against fio and DeepSpeed's aio: sequential O_DIRECT write and read of one file.

For every block size x queue depth (default 1, 4, 8 MiB x 8, 32) and both directions it runs, on the
same file in the project's temp dir (``<repo>/.tmp/aio-bench``, ``--dir`` to change):

  fio-libaio, fio-io_uring   fio sequential IO, ``--direct=1 --bs=B --iodepth=Q``, one job (fio from
                             Debian: installed with apt-get when missing and run as root)
  ds_native-<backend>        ``AsyncIOHandle(block_size=B, queue_depth=Q, backend=...)``: one request
                             for the whole file from a 4 KiB-aligned buffer, submit to wait()
  deepspeed                  DeepSpeed's ``AsyncIOBuilder().load().aio_handle(B, Q, False, True, 1)``
                             (overlap_events on, as its tuning guide recommends) in the interpreter of
                             ``--deepspeed-python`` (default: this one, when it imports deepspeed)

O_DIRECT bypasses the page cache, so nothing needs dropping between runs: every figure is the disk
(for a virtual disk: the host's storage path, which may have its own cache). The file is written in
full once before timing, so writes overwrite allocated blocks rather than extend the file.

Each tool runs ``--repeats`` times per setting (order rotated each round); a row keeps the best run
(load from other processes only ever slows a run down) and the median. ``--json PATH`` writes the
rows plus ``min_ratio_vs_fio: {read, write}`` (our default backend at each
setting over the better fio engine at that setting, the minimum over settings),
``best_vs_deepspeed: {read, write}`` (our best over DeepSpeed's best; null without deepspeed) and
``default_vs_best: {read, write}`` (``AsyncIOHandle()``'s defaults, 8 MiB x 8, over our best row;
``default_vs_best_median`` the same from each cell's median), and
``min_ratio_vs_fio_4k_pages`` (the row ``ds_native-<default>-4k``: the same engine reading into /
writing from a buffer on 4 KiB pages, as fio's and DeepSpeed's are; on the VM of docs/aio.md the
buffer's page size, not the engine, decides most of the difference).

    python benchmarks/aio.py [--quick] [--size 2G] [--dir PATH] [--json PATH] [--block-sizes 1M,4M,8M]
        [--queue-depths 8,32] [--backends io_uring,libaio,threadpool] [--no-fio] [--deepspeed-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ds_native import aio

ROOT = Path(__file__).resolve().parent.parent
QUICK_SIZE = 64 << 20


def parse_size(text: str) -> int:
    """'2G', '256M', '64K' or a byte count."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def ensure_fio() -> str | None:
    """fio's path; installs Debian's fio when missing and running as root."""
    if shutil.which("fio") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "fio"], capture_output=True, check=False)
    return shutil.which("fio")


def run_fio(fio: str, engine: str, path: Path, size: int, bs: int, qd: int, op: str) -> dict:
    cmd = [fio, "--name=aio-bench", f"--filename={path}", f"--size={size}", f"--bs={bs}", f"--iodepth={qd}"]
    cmd += [f"--rw={op}", "--direct=1", f"--ioengine={engine}", "--numjobs=1", "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0][op]
    seconds = job["runtime"] / 1000.0
    return {"gbps": job["bw_bytes"] / 1e9, "seconds": seconds}


def run_ours(backend: str, buf: torch.Tensor, path: Path, bs: int, qd: int, op: str) -> dict:
    h = aio.AsyncIOHandle(block_size=bs, queue_depth=qd, backend=backend)
    t0 = time.perf_counter()
    (h.async_pread if op == "read" else h.async_pwrite)(buf, path)
    h.wait()
    seconds = time.perf_counter() - t0
    h.close()
    return {"gbps": buf.numel() / 1e9 / seconds, "seconds": seconds}


_DS_SCRIPT = r"""
import json, sys, time, torch
from deepspeed.ops.op_builder import AsyncIOBuilder
path, size, settings = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
op = AsyncIOBuilder().load(verbose=False)
probe = op.aio_handle(1 << 20, 8, False, True, 1)
try:
    buf = probe.new_cpu_locked_tensor(size, torch.empty(0, dtype=torch.uint8))
except Exception:
    buf = torch.empty(size, dtype=torch.uint8)
buf.fill_(7)
for bs, qd, kind in settings:
    h = op.aio_handle(bs, qd, False, True, 1)
    t0 = time.perf_counter()
    (h.async_pread if kind == "read" else h.async_pwrite)(buf, path)
    n = h.wait()
    s = time.perf_counter() - t0
    print(json.dumps({"block_size": bs, "queue_depth": qd, "op": kind, "seconds": s, "gbps": size / 1e9 / s, "ops": n}))
    sys.stdout.flush()
"""


def deepspeed_python(arg: str | None) -> str | None:
    candidates = [arg] if arg else [sys.executable]
    for py in candidates:
        ok = subprocess.run([py, "-c", "import deepspeed"], capture_output=True, check=False, env=_ds_env())
        if ok.returncode == 0:
            return py
    return None


def _ds_env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


def run_deepspeed(py: str, path: Path, size: int, settings: list[tuple[int, int, str]]) -> list[dict]:
    out = subprocess.run(
        [py, "-c", _DS_SCRIPT, str(path), str(size), json.dumps(settings)],
        capture_output=True,
        text=True,
        env=_ds_env(),
        check=False,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or len(rows) != len(settings):
        print(f"deepspeed run failed (rc {out.returncode}): {out.stderr[-2000:]}", file=sys.stderr)
    return rows


def summarize(rows: list[dict], default_backend: str) -> dict:
    def best(
        tool_prefix: str, op: str, bs: int | None = None, qd: int | None = None, exact: bool = False
    ) -> float | None:
        vals = [
            r["gbps"]
            for r in rows
            if (r["tool"] == tool_prefix if exact else r["tool"].startswith(tool_prefix))
            and r["op"] == op
            and (bs is None or r["block_size"] == bs)
            and (qd is None or r["queue_depth"] == qd)
        ]
        return max(vals) if vals else None

    settings = sorted({(r["block_size"], r["queue_depth"]) for r in rows})
    summary: dict = {
        "min_ratio_vs_fio": {},
        "min_ratio_vs_fio_4k_pages": {},
        "best_vs_deepspeed": {},
        "default_vs_best": {},
        "default_vs_best_median": {},
    }
    for op in ("read", "write"):
        ratios = []
        for bs, qd in settings:
            fio, ours = best("fio-", op, bs, qd), best(f"ds_native-{default_backend}", op, bs, qd, exact=True)
            if fio and ours:
                ratios.append(ours / fio)
        summary["min_ratio_vs_fio"][op] = round(min(ratios), 3) if ratios else None
        ratios_4k = [
            ours / fio
            for bs, qd in settings
            if (fio := best("fio-", op, bs, qd)) and (ours := best(f"ds_native-{default_backend}-4k", op, bs, qd))
        ]
        summary["min_ratio_vs_fio_4k_pages"][op] = round(min(ratios_4k), 3) if ratios_4k else None
        ours_best, ds_best = best("ds_native-", op), best("deepspeed", op)
        summary["best_vs_deepspeed"][op] = round(ours_best / ds_best, 3) if ours_best and ds_best else None
        # AsyncIOHandle()'s own defaults (8 MiB x 8): the setting a user who tunes nothing gets.
        default = best(f"ds_native-{default_backend}", op, aio.DEFAULT_BLOCK_SIZE, aio.DEFAULT_QUEUE_DEPTH, exact=True)
        summary["default_vs_best"][op] = round(default / ours_best, 3) if default and ours_best else None
        # The same from medians: a best-of-N maximum over every cell favours whichever cell got lucky.
        med = {
            (r["tool"], r["block_size"], r["queue_depth"]): r["gbps_median"]
            for r in rows
            if r["op"] == op
            and r["tool"].startswith("ds_native-")
            and not r["tool"].endswith("-4k")
            and "gbps_median" in r
        }
        key = (f"ds_native-{default_backend}", aio.DEFAULT_BLOCK_SIZE, aio.DEFAULT_QUEUE_DEPTH)
        summary["default_vs_best_median"][op] = round(med[key] / max(med.values()), 3) if key in med and med else None
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"a {QUICK_SIZE >> 20} MiB file, 1 and 4 MiB blocks")
    p.add_argument("--size", default=None, help="file size (default 2G; --quick: 64M)")
    p.add_argument("--dir", default=str(ROOT / ".tmp" / "aio-bench"), help="where the test file goes")
    p.add_argument("--json", default=None, help="write rows and summary here")
    p.add_argument("--block-sizes", default=None, help="comma list, default 1M,4M,8M (--quick: 1M,4M)")
    p.add_argument("--queue-depths", default="8,32")
    p.add_argument("--backends", default=None, help="comma list (default: every usable backend)")
    p.add_argument(
        "--repeats", type=int, default=None, help="runs per tool and setting, best kept (default 3; --quick 1)"
    )
    p.add_argument("--no-fio", action="store_true")
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument(
        "--deepspeed-python", default=os.environ.get("DEEPSPEED_PYTHON"), help="an interpreter with deepspeed"
    )
    args = p.parse_args()

    args.repeats = args.repeats or (1 if args.quick else 3)
    size = parse_size(args.size) if args.size else (QUICK_SIZE if args.quick else 2 << 30)
    block_sizes = [parse_size(b) for b in (args.block_sizes or ("1M,4M" if args.quick else "1M,4M,8M")).split(",")]
    queue_depths = [int(q) for q in args.queue_depths.split(",")]
    size = max(size // max(block_sizes) * max(block_sizes), max(block_sizes))  # whole blocks, as fio does
    backends = args.backends.split(",") if args.backends else aio.backends()
    default_backend = aio.default_backend()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "aio-bench.bin"
    fio = None if args.no_fio else ensure_fio()
    ds_py = None if args.no_deepspeed else deepspeed_python(args.deepspeed_python)

    buf = aio.aligned_empty(size)
    buf.copy_(torch.randint(0, 256, (min(size, 64 << 20),), dtype=torch.uint8).repeat(-(-size // (64 << 20)))[:size])
    # fio's and DeepSpeed's buffers sit on ordinary 4 KiB pages; ours on huge pages (aligned_empty's
    # default). This copy on 4 KiB pages separates the engine from the buffer in the comparison.
    buf4k = aio.aligned_empty(size, huge_pages=False).copy_(buf)
    # Every backend first proves a round trip exact (write, read into another buffer, compare).
    verified = {}
    for backend in backends:
        n = min(size, 64 << 20)
        h = aio.AsyncIOHandle(block_size=1 << 20, queue_depth=8, backend=backend)
        h.sync_pwrite(buf[:n], path)
        back = aio.aligned_empty(n)
        h.sync_pread(back, path)
        verified[backend] = bool(torch.equal(back, buf[:n]))
    # Write the whole file once, so that every timed write overwrites allocated blocks.
    aio.AsyncIOHandle(block_size=8 << 20, queue_depth=8).sync_pwrite(buf, path)

    runs: dict[tuple, list[float]] = {}
    settings = [(bs, qd) for bs in block_sizes for qd in queue_depths]
    for bs, qd in settings:
        for op in ("write", "read"):
            tools = [(f"fio-{e}", e) for e in (("libaio", "io_uring") if fio else ())]
            tools += [(f"ds_native-{b}", b) for b in backends]
            tools += [(f"ds_native-{default_backend}-4k", "4k")]  # the same engine, buffer on 4 KiB pages
            for rep in range(args.repeats):
                # Rotate the order every round, so that load drift on a shared machine spreads evenly.
                k = rep % len(tools)
                for tool, which in tools[k:] + tools[:k]:
                    if tool.startswith("fio-"):
                        r = run_fio(fio, which, path, size, bs, qd, op)
                    elif which == "4k":
                        r = run_ours(default_backend, buf4k, path, bs, qd, op)
                    else:
                        r = run_ours(which, buf, path, bs, qd, op)
                    runs.setdefault((tool, op, bs, qd), []).append(r["gbps"])
            print(
                " ".join(f"{t}:{max(runs[(t, op, bs, qd)]):.2f}" for t, _ in tools),
                f"[{op} bs={bs >> 20}M qd={qd}]",
                flush=True,
            )
    if ds_py:
        ds_settings = [(bs, qd, op) for _ in range(args.repeats) for bs, qd in settings for op in ("write", "read")]
        for r in run_deepspeed(ds_py, path, size, ds_settings):
            runs.setdefault(("deepspeed", r["op"], r["block_size"], r["queue_depth"]), []).append(r["gbps"])
    rows = [
        {"tool": tool, "op": op, "block_size": bs, "queue_depth": qd, "gbps": round(max(v), 3),
         "gbps_median": round(statistics.median(v), 3), "runs": [round(x, 3) for x in v]}
        for (tool, op, bs, qd), v in runs.items()
    ]  # fmt: skip
    path.unlink(missing_ok=True)

    summary = summarize(rows, default_backend)
    result = {
        "benchmark": "aio",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "dir": str(directory)},
        "size_bytes": size,
        "default_backend": default_backend,
        "fio": fio is not None,
        "deepspeed": ds_py is not None,
        "repeats": args.repeats,
        "verified": verified,
        "rows": rows,
        **summary,
    }
    print(f"{'tool':<22}{'op':<7}{'block':>7}{'qd':>5}{'best GB/s':>11}{'median':>8}")
    for r in rows:
        print(
            f"{r['tool']:<22}{r['op']:<7}{r['block_size'] >> 20:>6}M{r['queue_depth']:>5}{r['gbps']:>11.2f}{r['gbps_median']:>8.2f}"
        )
    print(json.dumps(summary))
    if not all(verified.values()):
        print("ERROR: a read returned different bytes than were written", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
