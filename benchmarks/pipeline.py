"""Pipeline parallelism on 2 gloo ranks: pipe3d's schedules against one process and torch.distributed.pipelining.

A tiny GPT (pipe3d.models: embedding, N transformer blocks, norm, untied LM head; untied so that
torch's pipelining can run the very same split; ``partition_method="type:Block"``, half the blocks
per stage, for pipe3d, torch and DeepSpeed alike) trains with SGD, 8 micro-batches per step, on 2
ranks × 1 thread. Modes, each stepping in turn (round-robin, so noise from other processes falls
on all of them alike), rank 0's clock after a barrier:

  single          the whole model in one process (rank 0; rank 1 waits), the same 8 micro-batches
  gpipe / 1f1b    pipe3d.PipelineEngine, 2 stages, one chunk each
  interleaved     pipe3d, 2 stages × 2 chunks (interleaved 1F1B)
  torch-gpipe / torch-1f1b / torch-interleaved
                  torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B / ScheduleInterleaved1F1B
                  over PipelineStage's holding the same layers
  ds-1f1b         DeepSpeed's PipelineModule + train_batch (its 1F1B), when ``deepspeed`` imports

Per pipe3d schedule: ``bubble_measured`` (1 - forward/backward compute time / step wall time on
each stage, the mean of the two stages), ``bubble_formula`` ((p-1)/(v·m+p-1)),
``throughput_vs_single`` (samples/s over the single process's), ``peak_activation_bytes`` (the
most bytes autograd kept for live micro-batches on a stage, from a separate counting run), and
``vs_torch_pipelining`` (its throughput over torch's same schedule).

    python benchmarks/pipeline.py [--quick] [--json PATH] [--blocks 8] [--dim 192] [--seq 64] [--steps 6]
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

from pipe3d import PipelineEngine, PipelineModule, bubble_formula  # noqa: E402
from pipe3d.models import Reference, batches, gpt_specs, loss_fn  # noqa: E402
from pipe3d.schedule import make_schedule, simulate  # noqa: E402

STAGES, MICRO_BATCHES, LR = 2, 8, 1e-3
SCHEDULES = ["gpipe", "1f1b", "interleaved"]
TORCH = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B"}


def _specs(args: argparse.Namespace) -> list[Any]:
    return gpt_specs(args.blocks, tied=False, vocab=args.vocab, dim=args.dim, seq=args.seq, heads=args.heads)


def _data(args: argparse.Namespace, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return batches(MICRO_BATCHES, args.micro, seed=step, vocab=args.vocab, seq=args.seq)


class _Single:
    """The whole model on rank 0."""

    def __init__(self, args: argparse.Namespace, rank: int) -> None:
        self.rank = rank
        self.model = Reference(_specs(args)) if rank == 0 else None
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR) if self.model is not None else None

    def step(self, data: list[Any]) -> float:
        if self.model is None:
            return 0.0
        total = 0.0
        for x, y in data:
            loss = loss_fn(self.model(x), y) / len(data)
            loss.backward()
            total += float(loss.detach())
        self.opt.step()
        self.opt.zero_grad()
        return total


class _Pipe3d:
    def __init__(self, args: argparse.Namespace, schedule: str, measure: bool = False) -> None:
        chunks = 2 if schedule == "interleaved" else 1
        self.module = PipelineModule(
            _specs(args),
            num_stages=STAGES,
            loss_fn=loss_fn,
            seed_layers=True,
            partition_method="type:Block",
            num_chunks=chunks,
        )
        self.opt = torch.optim.SGD(self.module.parameters(), lr=LR)
        self.engine = PipelineEngine(
            self.module, MICRO_BATCHES, schedule=schedule, optimizer=self.opt, measure_memory=measure
        )

    def step(self, data: list[Any]) -> float:
        return float(self.engine.train_batch(iter(data)))


class _TorchPipelining:
    """torch.distributed.pipelining over the same layers (pipe3d's partitioning decides the split)."""

    def __init__(self, args: argparse.Namespace, schedule: str, rank: int) -> None:
        from torch.distributed import pipelining as tp

        chunks = 2 if schedule == "interleaved" else 1
        # Build with pipe3d to get the same layers and the same split; run them with torch's schedules.
        ref = PipelineModule(
            _specs(args),
            num_stages=STAGES,
            loss_fn=loss_fn,
            seed_layers=True,
            partition_method="type:Block",
            num_chunks=chunks,
        )
        self.stages = []
        for c in range(chunks):
            layers = [f for f in ref.forward_funcs[c]]
            sub = torch.nn.Sequential(*layers)
            self.stages.append(tp.PipelineStage(sub, c * STAGES + rank, STAGES * chunks, torch.device("cpu")))
        params = [p for s in self.stages for p in s.submod.parameters()]
        self.opt = torch.optim.SGD(params, lr=LR)
        cls = getattr(tp, TORCH[schedule])
        stages = self.stages if schedule == "interleaved" else self.stages[0]
        self.schedule = cls(stages, MICRO_BATCHES, loss_fn=loss_fn)
        self.rank = rank
        self.chunks = chunks

    def step(self, data: list[Any]) -> float:
        x = torch.cat([d[0] for d in data])
        y = torch.cat([d[1] for d in data])
        losses: list[torch.Tensor] = []
        if self.chunks == 1 and self.rank == 0:
            self.schedule.step(x)
        elif self.chunks == 1:
            self.schedule.step(target=y, losses=losses)
        else:
            # Interleaved: rank 0 holds virtual stages 0 and 2, rank 1 stages 1 and 3 (the last).
            self.schedule.step(x, target=y, losses=losses)
        self.opt.step()
        self.opt.zero_grad()
        return float(torch.stack(losses).detach().mean()) if losses else 0.0


class _DeepSpeed:
    """DeepSpeed's PipelineModule and train_batch on the same layer list (when deepspeed imports)."""

    def __init__(self, args: argparse.Namespace) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        from deepspeed.pipe import LayerSpec as DSLayerSpec
        from deepspeed.pipe import PipelineModule as DSPipelineModule

        layers = [DSLayerSpec(s.typename, *s.module_args, **s.module_kwargs) for s in _specs(args)]
        module = DSPipelineModule(
            # seed_layers stays off: DeepSpeed 0.19.8's per-layer seeding fails with type: partitioning here
            # ("The only supported seed types are ..."); the initial weights do not change the step time.
            layers,
            num_stages=STAGES,
            loss_fn=loss_fn,
            partition_method="type:Block",
        )
        config = {
            "train_micro_batch_size_per_gpu": args.micro,
            "gradient_accumulation_steps": MICRO_BATCHES,
            "optimizer": {"type": "SGD", "params": {"lr": LR}},
            "steps_per_print": 10**9,
        }
        self.engine, *_ = deepspeed.initialize(model=module, config=config, model_parameters=module.parameters())

    def step(self, data: list[Any]) -> float:
        return float(self.engine.train_batch(iter(data)))


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    modes: dict[str, Any] = {"single": _Single(args, rank)}
    for s in SCHEDULES:
        modes[s] = _Pipe3d(args, s)
    for s in SCHEDULES:
        try:
            modes[f"torch-{s}"] = _TorchPipelining(args, s, rank)
        except Exception as e:  # noqa: BLE001 - reported, the rest of the benchmark goes on
            if rank == 0:
                print(f"torch.distributed.pipelining {s}: not run ({type(e).__name__}: {e})", file=sys.stderr)
    if args.deepspeed:
        try:
            modes["ds-1f1b"] = _DeepSpeed(args)
        except ImportError:
            pass
        except Exception as e:  # noqa: BLE001 - reported, the rest of the benchmark goes on
            if rank == 0:
                print(f"DeepSpeed: not run ({type(e).__name__}: {e})", file=sys.stderr)
    times: dict[str, list[float]] = {m: [] for m in modes}
    bubbles: dict[str, list[float]] = {s: [] for s in SCHEDULES}
    # Per schedule: this stage's forward/backward seconds per micro-batch, per local chunk, summed over steps.
    compute: dict[str, dict[str, list[float]]] = {}
    losses: dict[str, float] = {}
    for step in range(args.steps + 1):  # step 0 warms up (p2p negotiation, allocator)
        data = _data(args, step)
        for name, mode in modes.items():
            dist.barrier()
            t0 = time.perf_counter()
            loss = mode.step(data)
            dist.barrier()
            dt = time.perf_counter() - t0
            if step > 0:
                times[name].append(dt)
                if name in bubbles:
                    st = mode.engine.stats
                    bubbles[name].append(st.bubble)
                    acc = compute.setdefault(
                        name, {"fwd": [0.0] * len(st.forward_by_chunk), "bwd": [0.0] * len(st.forward_by_chunk)}
                    )
                    for c, (f, b) in enumerate(zip(st.forward_by_chunk, st.backward_by_chunk, strict=True)):
                        acc["fwd"][c] += f / (MICRO_BATCHES * args.steps)
                        acc["bwd"][c] += b / (MICRO_BATCHES * args.steps)
            losses[name] = loss
    # Peak activation bytes: a separate run with the saved-tensor counter on (it costs time).
    peaks = {}
    for s in SCHEDULES:
        m = _Pipe3d(args, s, measure=True)
        m.step(_data(args, 0))
        peak = torch.tensor([float(m.engine.stats.peak_activation_bytes)])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        peaks[s] = int(peak.item())
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"bubbles": bubbles, "compute": compute})
    if rank == 0:
        mean_bubbles = {s: statistics.mean(b for g in gathered for b in g["bubbles"][s]) for s in SCHEDULES}
        simulated = {s: _simulated_bubble(s, [g["compute"][s] for g in gathered]) for s in SCHEDULES}
        queue.put({"times": times, "bubbles": mean_bubbles, "simulated": simulated, "peaks": peaks, "losses": losses})
    dist.barrier()
    dist.destroy_process_group()


def _simulated_bubble(schedule: str, per_stage: list[dict[str, list[float]]]) -> float:
    """The bubble of ``schedule`` with each virtual stage's *measured* compute time and free communication.

    The formula assumes equal stages; these are not (the first holds the embedding, the last the
    head and the loss). The gap between this and ``bubble_measured`` is what the executor and the
    transport add; the gap between this and the formula is the partition's imbalance.
    """
    chunks = len(per_stage[0]["fwd"])
    fwd, bwd = [0.0] * (STAGES * chunks), [0.0] * (STAGES * chunks)
    for stage, times in enumerate(per_stage):
        for c in range(chunks):
            fwd[c * STAGES + stage], bwd[c * STAGES + stage] = times["fwd"][c], times["bwd"][c]
    return simulate(make_schedule(schedule, MICRO_BATCHES, STAGES, chunks), fwd, bwd).stage_bubble


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(
        _rank_main, args=(2, _free_port(), args, queue), nprocs=2, join=False, start_method="spawn"
    )
    while not procs.join(timeout=1):
        pass
    return queue.get()


def report(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    samples = MICRO_BATCHES * args.micro
    med = {m: statistics.median(t) for m, t in res["times"].items() if t}
    tput = {m: samples / t for m, t in med.items()}
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "config": {k: getattr(args, k) for k in ("blocks", "dim", "seq", "vocab", "micro", "steps")}
        | {"stages": STAGES, "micro_batches": MICRO_BATCHES},
        "seconds_per_step": med,
        "schedules": {},
    }
    print(
        f"tiny GPT {args.blocks} blocks d{args.dim} seq{args.seq}, {STAGES} stages, m={MICRO_BATCHES}, micro {args.micro}"
    )
    print(f"{'mode':18s} {'s/step':>8s} {'samples/s':>10s} {'x single':>9s}")
    for m in med:
        print(f"{m:18s} {med[m]:8.3f} {tput[m]:10.1f} {tput[m] / tput['single']:9.2f}")
    print(
        f"\n{'schedule':12s} {'bubble':>7s} {'formula':>8s} {'at stage times':>15s} {'x single':>9s} "
        f"{'peak act MiB':>13s} {'x torch':>8s}"
    )
    for s in SCHEDULES:
        chunks = 2 if s == "interleaved" else 1
        torch_t = tput.get(f"torch-{s}")
        row = {
            "bubble_measured": res["bubbles"][s],
            "bubble_formula": bubble_formula(STAGES, MICRO_BATCHES, chunks),
            "bubble_at_measured_compute": res["simulated"][s],
            "throughput_vs_single": tput[s] / tput["single"],
            "peak_activation_bytes": res["peaks"][s],
            "vs_torch_pipelining": (tput[s] / torch_t) if torch_t else None,
        }
        if s == "1f1b" and "ds-1f1b" in tput:
            row["vs_deepspeed"] = tput[s] / tput["ds-1f1b"]
        out["schedules"][s] = row
        vt = f"{row['vs_torch_pipelining']:8.2f}" if torch_t else f"{'-':>8s}"
        print(
            f"{s:12s} {row['bubble_measured']:7.3f} {row['bubble_formula']:8.3f} "
            f"{row['bubble_at_measured_compute']:15.3f} {row['throughput_vs_single']:9.2f} "
            f"{row['peak_activation_bytes'] / 2**20:13.2f} {vt}"
        )
    if "ds-1f1b" in tput:
        print(f"\n1f1b / DeepSpeed PipelineModule throughput: {out['schedules']['1f1b']['vs_deepspeed']:.2f}")
    out["final_losses"] = res["losses"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model and few steps (under a minute)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4, help="samples per micro-batch")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-deepspeed", dest="deepspeed", action="store_false", help="skip DeepSpeed even if it imports")
    args = ap.parse_args()
    if args.quick:
        args.blocks, args.dim, args.heads, args.seq, args.vocab, args.micro, args.steps = 4, 64, 2, 32, 256, 2, 3
    out = report(run(args), args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
