"""Pipeline schedules as plain data: per stage, the ordered list of instructions it runs.

A schedule is built from the *compute order* of each stage (which forward and backward of which
micro-batch and model chunk comes next); the communication follows from it mechanically: a
receive goes right before the compute that needs it, a send right after the compute that produced
it. Sends are non-blocking in the executor and receives block, so a schedule cannot deadlock as
long as the compute orders are consistent; :func:`simulate` checks that (and measures the bubble
in unit-time steps) without any process, so the tests can inspect every schedule directly.

Virtual stages (interleaved 1F1B): with ``chunks = v`` each stage holds ``v`` model chunks;
chunk ``c`` of stage ``s`` is virtual stage ``c * P + s`` of ``P * v``, so activations go
``s -> s+1`` and from the last stage back to stage 0 for the next chunk (Megatron's layout).

Schedules (``P`` stages, ``m`` micro-batches):

- :class:`GPipe`: all forwards, then all backwards; holds ``m`` micro-batches' activations.
- :class:`OneFOneB` (PipeDream-flush, DeepSpeed's ``TrainSchedule``): ``P - s - 1`` warm-up
  forwards, then one forward / one backward; holds at most ``P - s`` micro-batches.
- :class:`Interleaved1F1B` (Megatron's interleaved schedule): 1F1B over ``v`` chunks per stage;
  ``m`` must be a multiple of ``P``. The bubble shrinks by ``v``: ``(P-1) / (v·m + P - 1)``.
- :class:`InferenceSchedule`: forwards only (``eval_batch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "Backward",
    "Forward",
    "GPipe",
    "InferenceSchedule",
    "Instruction",
    "Interleaved1F1B",
    "OneFOneB",
    "PipeSchedule",
    "RecvActivation",
    "RecvGrad",
    "SendActivation",
    "SendGrad",
    "SimulationResult",
    "bubble_formula",
    "make_schedule",
    "simulate",
]


@dataclass(frozen=True)
class Instruction:
    """One step of a stage's program: ``micro_batch`` and ``chunk`` (the local model chunk) it acts on."""

    micro_batch: int
    chunk: int = 0

    @property
    def name(self) -> str:
        """The instruction's kind (its class name)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name}(mb={self.micro_batch}, chunk={self.chunk})"


class Forward(Instruction):
    """Run the chunk's layers on the micro-batch (and the loss on the last virtual stage)."""


class Backward(Instruction):
    """Back-propagate the micro-batch through the chunk."""


class RecvActivation(Instruction):
    """Receive the chunk's input activations from the previous virtual stage."""


class SendActivation(Instruction):
    """Send the chunk's output activations to the next virtual stage (non-blocking)."""


class RecvGrad(Instruction):
    """Receive the gradient of the chunk's outputs from the next virtual stage."""


class SendGrad(Instruction):
    """Send the gradient of the chunk's inputs to the previous virtual stage (non-blocking)."""


class PipeSchedule:
    """Base class: ``steps(stage)`` is the instruction list of one stage.

    Args:
        micro_batches: ``m``, the micro-batches per step (``gradient_accumulation_steps``).
        stages: ``P``, the pipeline stages.
        chunks: model chunks (virtual stages) per stage; 1 except for interleaved schedules.
    """

    name = "base"

    def __init__(self, micro_batches: int, stages: int, chunks: int = 1) -> None:
        if micro_batches < 1 or stages < 1 or chunks < 1:
            raise ValueError(
                f"{type(self).__name__}: micro_batches, stages and chunks must be >= 1, "
                f"got {micro_batches}, {stages}, {chunks}"
            )
        self.micro_batches = micro_batches
        self.stages = stages
        self.chunks = chunks

    @property
    def virtual_stages(self) -> int:
        """``P * v``: the number of model chunks over the whole pipeline."""
        return self.stages * self.chunks

    def virtual_stage(self, stage: int, chunk: int) -> int:
        """The virtual stage index of ``chunk`` on ``stage``."""
        return chunk * self.stages + stage

    def compute_order(self, stage: int) -> list[Instruction]:
        """The Forward/Backward instructions of ``stage`` in the order it runs them."""
        raise NotImplementedError

    def steps(self, stage: int) -> list[Instruction]:
        """``stage``'s whole program: compute order with receives before and sends after."""
        if not 0 <= stage < self.stages:
            raise ValueError(f"{type(self).__name__}: stage {stage} is outside 0..{self.stages - 1}")
        last = self.virtual_stages - 1
        out: list[Instruction] = []
        for ins in self.compute_order(stage):
            vs = self.virtual_stage(stage, ins.chunk)
            mb, c = ins.micro_batch, ins.chunk
            if isinstance(ins, Forward):
                if vs > 0:
                    out.append(RecvActivation(mb, c))
                out.append(ins)
                if vs < last:
                    out.append(SendActivation(mb, c))
            else:
                if vs < last:
                    out.append(RecvGrad(mb, c))
                out.append(ins)
                if vs > 0:
                    out.append(SendGrad(mb, c))
        return out

    def max_live_activations(self, stage: int) -> int:
        """The most micro-batch chunks whose forward ran but backward has not, on ``stage``."""
        live = peak = 0
        for ins in self.compute_order(stage):
            live += 1 if isinstance(ins, Forward) else -1 if isinstance(ins, Backward) else 0
            peak = max(peak, live)
        return peak

    def activation_bound(self, stage: int) -> int:
        """The schedule's promise on :meth:`max_live_activations` (what the tests check)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(micro_batches={self.micro_batches}, stages={self.stages}, chunks={self.chunks})"


class GPipe(PipeSchedule):
    """All forwards, then all backwards (in micro-batch order): ``m`` live micro-batches."""

    name = "gpipe"

    def compute_order(self, stage: int) -> list[Instruction]:
        """``F0 .. F(m-1), B0 .. B(m-1)``."""
        m = self.micro_batches
        return [Forward(i) for i in range(m)] + [Backward(i) for i in range(m)]

    def activation_bound(self, stage: int) -> int:
        """``m``."""
        return self.micro_batches


class OneFOneB(PipeSchedule):
    """PipeDream-flush: warm-up forwards, one-forward-one-backward, cool-down backwards."""

    name = "1f1b"

    def compute_order(self, stage: int) -> list[Instruction]:
        """``P - s - 1`` forwards, then alternating F/B, then the remaining backwards."""
        m = self.micro_batches
        warmup = min(self.stages - stage - 1, m)
        order: list[Instruction] = [Forward(i) for i in range(warmup)]
        f, b = warmup, 0
        while f < m:
            order += [Forward(f), Backward(b)]
            f, b = f + 1, b + 1
        order += [Backward(i) for i in range(b, m)]
        return order

    def activation_bound(self, stage: int) -> int:
        """``min(P - s, m)``: at most ``P`` micro-batches, whatever ``m``."""
        return min(self.stages - stage, self.micro_batches)


class Interleaved1F1B(PipeSchedule):
    """Megatron's interleaved 1F1B over ``chunks`` model chunks per stage (``m % P == 0``)."""

    name = "interleaved"

    def __init__(self, micro_batches: int, stages: int, chunks: int = 2) -> None:
        super().__init__(micro_batches, stages, chunks)
        if micro_batches % stages != 0:
            raise ValueError(
                f"Interleaved1F1B: micro_batches ({micro_batches}) must be a multiple of the pipeline stages "
                f"({stages}); use gradient_accumulation_steps = k * {stages}"
            )

    def _unit(self, k: int, forward: bool) -> tuple[int, int]:
        """(micro-batch, chunk) of the ``k``-th forward (or backward) of a stage."""
        P, v = self.stages, self.chunks
        group, within = divmod(k, P * v)
        chunk = within // P
        if not forward:
            chunk = v - 1 - chunk
        return group * P + within % P, chunk

    def _warmup(self, stage: int) -> int:
        P, v, m = self.stages, self.chunks, self.micro_batches
        if v == 1:
            return min(P - stage - 1, m)
        return min((P - stage - 1) * 2 + (v - 1) * P, m * v)

    def compute_order(self, stage: int) -> list[Instruction]:
        """Warm-up forwards over the chunks, then 1F1B, then cool-down (Megatron's order)."""
        total = self.micro_batches * self.chunks
        warmup = self._warmup(stage)
        order: list[Instruction] = [Forward(*self._unit(k, True)) for k in range(warmup)]
        f, b = warmup, 0
        while f < total:
            order += [Forward(*self._unit(f, True)), Backward(*self._unit(b, False))]
            f, b = f + 1, b + 1
        order += [Backward(*self._unit(k, False)) for k in range(b, total)]
        return order

    def activation_bound(self, stage: int) -> int:
        """Warm-up forwards + 1 chunk-activations (Megatron's bound)."""
        return min(self._warmup(stage) + 1, self.micro_batches * self.chunks)


class InferenceSchedule(PipeSchedule):
    """Forwards only, in micro-batch order (no activations kept for a backward)."""

    name = "inference"

    def compute_order(self, stage: int) -> list[Instruction]:
        """``F0 .. F(m-1)`` for every chunk, micro-batch-major (chunk c of a micro-batch after chunk c-1)."""
        return [Forward(i, c) for i in range(self.micro_batches) for c in range(self.chunks)]

    def activation_bound(self, stage: int) -> int:
        """No activations are kept."""
        return 0


SCHEDULES = {"gpipe": GPipe, "1f1b": OneFOneB, "interleaved": Interleaved1F1B}


def make_schedule(name: str, micro_batches: int, stages: int, chunks: int = 1) -> PipeSchedule:
    """A schedule by name: ``"gpipe"``, ``"1f1b"`` or ``"interleaved"`` (``chunks`` > 1 needs interleaved)."""
    key = str(name).lower().replace("-", "").replace("_", "")
    key = {"1f1b": "1f1b", "onefoneb": "1f1b", "gpipe": "gpipe", "interleaved": "interleaved"}.get(key, key)
    if key not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; accepted: 'gpipe', '1f1b', 'interleaved'")
    if key != "interleaved" and chunks != 1:
        raise ValueError(f"schedule {name!r} runs one model chunk per stage; use 'interleaved' for chunks={chunks}")
    if key == "interleaved":
        return Interleaved1F1B(micro_batches, stages, chunks)
    return SCHEDULES[key](micro_batches, stages)


def bubble_formula(stages: int, micro_batches: int, chunks: int = 1) -> float:
    """The idle fraction of a flushed pipeline: ``(P - 1) / (v·m + P - 1)`` (forward = backward time)."""
    return (stages - 1) / (chunks * micro_batches + stages - 1)


@dataclass
class SimulationResult:
    """What :func:`simulate` found: total time, per-stage busy time and the start time of every compute."""

    makespan: float
    busy: list[float]
    starts: dict[tuple[int, str, int, int], float]
    ends: list[float] = field(default_factory=list)

    @property
    def bubble(self) -> float:
        """Mean idle fraction over the stages."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)

    @property
    def stage_bubble(self) -> float:
        """Mean over stages of each stage's idle fraction of its *own* program time (start to its last
        instruction), the executor's :attr:`pipe3d.executor.BatchStats.bubble` in simulated time."""
        return sum(1.0 - b / e for b, e in zip(self.busy, self.ends, strict=True)) / len(self.busy)


def simulate(
    schedule: PipeSchedule,
    forward_time: float | Sequence[float] = 1.0,
    backward_time: float | Sequence[float] = 1.0,
) -> SimulationResult:
    """Run every stage's program against the others in simulated time; raise on a deadlock.

    A stage runs its instructions in order; a receive waits until the peer has sent that message
    (sends never wait, as in the executor). Per ordered pair of stages and message kind, receives
    must match sends in FIFO order (what NCCL requires): a violation is an error too. Forward of a
    chunk takes ``forward_time / chunks``, backward ``backward_time / chunks``; or, given a sequence
    of ``P * chunks`` times, virtual stage ``i``'s forward (backward) of one micro-batch takes
    ``forward_time[i]`` (``backward_time[i]``): unequal stages, e.g. measured ones.
    """
    P, v = schedule.stages, schedule.chunks

    def per_vs(t: float | Sequence[float], name: str) -> list[float]:
        if isinstance(t, (int, float)):
            return [float(t) / v] * (P * v)
        times = [float(x) for x in t]
        if len(times) != P * v:
            raise ValueError(f"simulate: {name} needs one time per virtual stage ({P * v}), got {len(times)}")
        return times

    fwd, bwd = per_vs(forward_time, "forward_time"), per_vs(backward_time, "backward_time")
    progs = [schedule.steps(s) for s in range(P)]
    pc = [0] * P
    clock = [0.0] * P
    busy = [0.0] * P
    sent: dict[tuple[str, int, int], float] = {}  # (kind, virtual stage from, mb) -> time sent
    fifo_sent: dict[tuple[str, int, int], list[tuple[int, int]]] = {}  # (kind, src, dst) -> messages
    fifo_recv: dict[tuple[str, int, int], list[tuple[int, int]]] = {}
    starts: dict[tuple[int, str, int, int], float] = {}

    def peer(vs: int) -> int:
        return vs % P

    while any(pc[s] < len(progs[s]) for s in range(P)):
        progressed = False
        for s in range(P):
            while pc[s] < len(progs[s]):
                ins = progs[s][pc[s]]
                vs = schedule.virtual_stage(s, ins.chunk)
                mb = ins.micro_batch
                if isinstance(ins, RecvActivation):
                    key = ("act", vs - 1, mb)
                    if key not in sent:
                        break
                    clock[s] = max(clock[s], sent[key])
                    fifo_recv.setdefault(("act", peer(vs - 1), s), []).append((vs - 1, mb))
                elif isinstance(ins, RecvGrad):
                    key = ("grad", vs + 1, mb)
                    if key not in sent:
                        break
                    clock[s] = max(clock[s], sent[key])
                    fifo_recv.setdefault(("grad", peer(vs + 1), s), []).append((vs + 1, mb))
                elif isinstance(ins, SendActivation):
                    sent[("act", vs, mb)] = clock[s]
                    fifo_sent.setdefault(("act", s, peer(vs + 1)), []).append((vs, mb))
                elif isinstance(ins, SendGrad):
                    sent[("grad", vs, mb)] = clock[s]
                    fifo_sent.setdefault(("grad", s, peer(vs - 1)), []).append((vs, mb))
                else:
                    dt = (fwd if isinstance(ins, Forward) else bwd)[vs]
                    starts[(s, ins.name, mb, ins.chunk)] = clock[s]
                    clock[s] += dt
                    busy[s] += dt
                pc[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: progs[s][pc[s]] for s in range(P) if pc[s] < len(progs[s])}
            raise RuntimeError(f"{schedule}: deadlock, stages wait on {stuck}")
    for key, recvs in fifo_recv.items():
        if fifo_sent.get(key) != recvs:
            raise RuntimeError(f"{schedule}: messages {key} are received in another order than sent")
    return SimulationResult(makespan=max(clock), busy=busy, starts=starts, ends=list(clock))
