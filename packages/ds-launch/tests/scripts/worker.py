"""Test worker: a gloo all_reduce, then a JSON report per rank; optionally fail or hang.

usage: worker.py OUTDIR [--fail-rank R] [--fail-code C] [--hang] [--ignore-term] [--term-delay S]
                 [--spawn-child] [--hold S]
(any other arguments are echoed in the report)

--term-delay S: on SIGTERM write OUTDIR/term_rankR, take S seconds to "clean up", then write
OUTDIR/term_done_rankR and exit 143: a rank that needs its grace period.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist

# DeepSpeed-style launchers pass --local_rank=N before the script's own arguments.
out_dir, *rest = [a for a in sys.argv[1:] if not a.startswith("--local_rank=")]
fail_rank = int(rest[rest.index("--fail-rank") + 1]) if "--fail-rank" in rest else -1
fail_code = int(rest[rest.index("--fail-code") + 1]) if "--fail-code" in rest else 3
hang = "--hang" in rest
hold = float(rest[rest.index("--hold") + 1]) if "--hold" in rest else 0.0
if "--ignore-term" in rest:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL stops this rank
term_delay = float(rest[rest.index("--term-delay") + 1]) if "--term-delay" in rest else None


def _slow_exit(_signum, _frame):
    rank = os.environ["RANK"]
    open(os.path.join(out_dir, f"term_rank{rank}"), "w").close()
    time.sleep(term_delay)
    open(os.path.join(out_dir, f"term_done_rank{rank}"), "w").close()
    os._exit(143)


if term_delay is not None:
    signal.signal(signal.SIGTERM, _slow_exit)

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.connect((os.environ["MASTER_ADDR"], 9))
    addr = s.getsockname()[0]
report = {
    "rank": rank,
    "world_size": world,
    "local_rank": int(os.environ["LOCAL_RANK"]),
    "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]),
    "local_size": int(os.environ["LOCAL_SIZE"]),
    "sum": t.item(),
    "addr": addr,
    "netns": os.readlink("/proc/self/ns/net"),
    "pid": os.getpid(),
    "master_port": int(os.environ["MASTER_PORT"]),
    "argv": sys.argv[1:],
    "test_value": os.environ.get("DSL_TEST_VALUE"),
    "child_pid": subprocess.Popen(["sleep", "600"]).pid if "--spawn-child" in rest else None,
}
with open(os.path.join(out_dir, f"rank{rank}.json.tmp"), "w") as f:
    json.dump(report, f)
os.replace(os.path.join(out_dir, f"rank{rank}.json.tmp"), os.path.join(out_dir, f"rank{rank}.json"))
print(f"rank {rank}/{world} sum={t.item()} addr={addr}", flush=True)

if rank == fail_rank:
    time.sleep(1.0)
    print(f"rank {rank} failing on purpose with code {fail_code}", file=sys.stderr, flush=True)
    with open(os.path.join(out_dir, "fail_time"), "w") as f:
        f.write(repr(time.time()))
    sys.exit(fail_code)
time.sleep(hold)  # keep the job (and its rendezvous port) alive, e.g. while another job starts
if hang or fail_rank >= 0:
    # Blocked in a collective the failed rank never joins, as a real job would be.
    while True:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - the peer is gone; keep hanging like a stuck job
            time.sleep(3600)
dist.destroy_process_group()
