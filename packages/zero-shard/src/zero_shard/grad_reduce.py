"""Bucketed gradient reduction driven by per-parameter post-accumulate-grad hooks.

Every stage uses the same buckets (whole parameters, about ``reduce_bucket_size`` elements, last
parameters first) and the same collective, so the reduced numbers do not depend on the stage. What
differs is where gradients wait to be reduced:

- stage 0 keeps one fp32 flat accumulator per group (the size of the group). Each parameter's gradient
  is added into it as soon as autograd produces it (upcast from bf16/fp16, so accumulation over
  micro-steps is in fp32) and the model's ``.grad`` is dropped. Only the backward of the last micro-step
  (the accumulation boundary) reduces, as DDP under ``no_sync``.
- stage 2 keeps only this rank's partition of the gradients, in ``partition_dtype`` (the model's dtype
  by default, as DeepSpeed and the ZeRO paper's 2Φ + 14Φ/N count; fp32 with ``grad_accum_dtype="fp32"``).
  Every micro-step reduces: a bucket's gradients go into a temporary fp32 bucket buffer, which is reduced
  in fp32 and then added into the partition (one rounding per micro-step when the partition is 16-bit). At
  most two buckets are in flight at once; with the buckets that are filling (normally one, more when a
  gradient arrives ahead of an earlier bucket's) gradient memory stays ``partition + a few buckets``. This is
  DeepSpeed's stage-2 behaviour too; its price is one reduction per micro-step.
- stage 1 reduces at the boundary only, as stage 0. Without gradient accumulation it needs no full
  accumulator: the boundary backward goes through bucket buffers into the partition, as stage 2. The
  full fp32 accumulator is allocated the first time a micro-step has to be kept for later (accumulation),
  and from then on the boundary reduces from it, as stage 0.

Stage 3 reduces as stage 2 does, into per-unit partitions, but its layouts are small (one per module):
there a bucket spans the ends of consecutive units (``cross_layout_buckets``) up to ``reduce_bucket_size``
elements, so that a model of many small modules still reduces in a few large collectives, with a few
waits in backward, rather than one collective and one wait per module. The bucket buffer is arranged
rank-major (every rank's pieces of every unit together), so one collective per owner, or one all-reduce,
carries the whole bucket.

[Note: averaging as DDP does] DDP multiplies each gradient by 1/N before summing; for the world sizes
that are powers of two that equals summing and then dividing, bit for bit. We sum, then multiply by
``predivide / N``, having multiplied by ``1 / predivide`` before the sum when ``gradient_predivide_factor``
is not 1 (DeepSpeed's rule). Stage 2 averages each micro-step's sum before accumulating, stages 0-1
accumulate then average once: with gradient accumulation the two orders differ by rounding only.

[Note: overlap_comm] With ``overlap_comm`` a bucket's collective is launched asynchronously as soon as
the bucket is ready and backward goes on computing; without it the collective runs (blocking) in the
hook that completes the bucket. Either way a bucket buffer is freed as soon as it is reduced.

[Note: launch order] Collectives must be issued in the same order on every rank, so buckets launch in
index order: a bucket that is ready waits for all earlier buckets to be ready (as DDP does).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from zero_shard.comm import GradCollective
from zero_shard.flat_buffer import FlatLayout

__all__ = ["GradReducer"]


@dataclass
class _Piece:
    """The part of a segment that one rank owns, and where it sits in the bucket buffer."""

    owner: int
    start: int  # [start, end) of the layout's flat buffer
    end: int
    offset: int  # where it starts in the bucket buffer


@dataclass
class _Segment:
    """A contiguous range ``[start, end)`` of one layout's flat buffer that a bucket covers."""

    layout: int
    start: int
    end: int
    slots: list[int]
    pieces: list[_Piece] = field(default_factory=list)


@dataclass
class _Bucket:
    segments: list[_Segment]
    owner_spans: list[tuple[int, int]]  # per rank: its [lo, hi) of the bucket buffer (rank-major order)
    numel: int
    pending: int = 0
    launched: bool = False
    buffer: torch.Tensor | None = None
    temp: bool = False  # buffer is a transient bucket buffer (not a view of the accumulator)
    works: list = field(default_factory=list)

    @property
    def slot_count(self) -> int:
        return sum(len(seg.slots) for seg in self.segments)


def _make_bucket(segments: list[_Segment], layouts: list[FlatLayout], world_size: int) -> _Bucket:
    """Arrange a bucket's segments rank-major: every rank's pieces of every segment lie together.

    For a bucket within one layout this is just the layout's own order (a layout is partitioned in rank
    order); for a bucket spanning several stage-3 units it lets one collective per owner (or one
    all-reduce) carry them all, and each rank find its partitions as one contiguous span.
    """
    spans = []
    offset = 0
    for r in range(world_size):
        lo = offset
        for seg in segments:
            P = layouts[seg.layout].partition_numel
            a, z = max(seg.start, r * P), min(seg.end, (r + 1) * P)
            if a < z:
                seg.pieces.append(_Piece(r, a, z, offset))
                offset += z - a
        spans.append((lo, offset))
    return _Bucket(segments, spans, offset)


class GradReducer:
    """Owns the fp32 gradient storage of a :class:`~zero_shard.ZeroShardedOptimizer` and reduces into it."""

    def __init__(
        self,
        layouts: list[FlatLayout],
        *,
        stage: int,
        rank: int,
        world_size: int,
        process_group: dist.ProcessGroup | None,
        bucket_numel: int,
        overlap_comm: bool,
        collective: GradCollective,
        predivide_factor: float,
        ignore_unused_parameters: bool,
        device: torch.device,
        partition_dtype: torch.dtype = torch.float32,
        cross_layout_buckets: bool = False,
    ) -> None:
        """``cross_layout_buckets`` (stage 3, where every module is its own layout): a bucket may span the
        ends of several layouts, so that many small units share one collective (about ``bucket_numel``
        elements each, as at stages 1-2) instead of one collective per unit."""
        if cross_layout_buckets and stage != 2:
            raise ValueError("GradReducer: buckets across layouts are for stage 2 reduction (ZeRO-3's units) only")
        self.layouts = layouts
        self.stage = stage
        self.rank = rank
        self.world_size = world_size
        self.group = process_group
        self.overlap_comm = overlap_comm
        self.collective = collective if world_size > 1 else "all_reduce"
        self.pre = 1.0 / predivide_factor
        self.post = predivide_factor / world_size
        self.ignore_unused = ignore_unused_parameters
        self.device = device
        if stage == 0:
            self.accum: list[torch.Tensor | None] = [
                torch.zeros(lay.padded_numel, dtype=torch.float32, device=device) for lay in layouts
            ]
            self.part_grads: list[torch.Tensor] = []
        else:
            # Stage 1 allocates the full accumulator lazily, on the first micro-step it must keep.
            self.accum = [None] * len(layouts)
            # Stage 1 reduces at the boundary only, straight into its partition: fp32 costs it nothing extra
            # at N = 2 against the paper's count, and keeps stage 1 bit-identical to stage 0.
            dtype = partition_dtype if stage == 2 else torch.float32
            self.part_grads = [torch.zeros(lay.partition_numel, dtype=dtype, device=device) for lay in layouts]
        self.live_bucket_buffers = 0
        self.peak_bucket_buffers = 0  # most transient bucket buffers alive at once (memory bound check)
        self.peak_in_flight = 0
        self._accumulated = False  # a micro-step's gradients wait in the accumulator (stages 0-1)
        self._via_accum = stage == 0  # this backward reduces from the accumulator
        self.buckets: list[_Bucket] = []
        self._where: dict[int, tuple[int, int, int]] = {}  # id(param) -> (bucket, segment, slot index)
        bucket_numel = max(1, bucket_numel)
        pending: list[_Segment] = []
        size = 0
        for g, lay in enumerate(layouts):
            for start, end, slots in lay.buckets(bucket_numel):
                if pending and (not cross_layout_buckets or size + end - start > bucket_numel):
                    self._add_bucket(pending)
                    pending, size = [], 0
                pending.append(_Segment(g, start, end, slots))
                size += end - start
        if pending:
            self._add_bucket(pending)
        self._next = 0
        self._communicate = True  # False: keep local gradients (see begin_backward)
        self._in_flight: deque[_Bucket] = deque()
        self._reducing = False
        self._callback_queued = False
        self._dirty = False
        self._handles = [
            p.register_post_accumulate_grad_hook(self._make_hook(p)) for lay in layouts for p in lay.params
        ]

    # ---- per-backward bookkeeping ------------------------------------------------------------------

    def begin_backward(self, boundary: bool, communicate: bool = True) -> None:
        """Called before each backward: will this one reduce (stage 2: always; else at the boundary)?

        ``communicate=False`` (stage 0 only): the boundary backward leaves every rank its own local
        gradients, un-averaged, for an optimizer that communicates them itself (onebit-comm's).
        """
        if not communicate and self.stage != 0:
            raise ValueError("GradReducer: local (uncommunicated) gradients are only supported at stage 0")
        self._communicate = communicate
        self._reducing = self.stage == 2 or boundary
        self._via_accum = self.stage == 0 or self._accumulated
        self._callback_queued = False
        self._next = 0
        for b in self.buckets:
            b.pending = b.slot_count
            b.launched = False
            b.buffer = None
            b.temp = False
            b.works = []

    def grads_for_step(self, group: int) -> torch.Tensor:
        """The averaged gradients this rank steps on: stage 0 the whole group, stages 1-2 its partition.

        fp32, except a 16-bit stage-2 partition, which is returned as it is (the caller upcasts it)."""
        acc = self.accum[group]
        if self.stage == 0:
            assert acc is not None
            return acc
        if self.stage == 1 and self._accumulated:
            assert acc is not None
            lo, hi = self.layouts[group].partition(self.rank)
            return acc[lo:hi]
        return self.part_grads[group]

    def zero_grad(self) -> None:
        """Clear the accumulated gradients (after a step, or when the engine asks)."""
        if not self._dirty:
            return
        for t in (*self.part_grads, *(a for a in self.accum if a is not None)):
            t.zero_()
        self._dirty = False
        self._accumulated = False

    def remove_hooks(self) -> None:
        """Detach from the model's parameters."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- hooks ---------------------------------------------------------------------------------------

    def _add_bucket(self, segments: list[_Segment]) -> None:
        index = len(self.buckets)
        for si, seg in enumerate(segments):
            for s in seg.slots:
                self._where[id(self.layouts[seg.layout].params[s])] = (index, si, s)
        self.buckets.append(_make_bucket(segments, self.layouts, self.world_size))

    def _make_hook(self, p: nn.Parameter) -> Callable[[nn.Parameter], None]:
        bucket_index, segment_index, slot_index = self._where[id(p)]

        def hook(param: nn.Parameter) -> None:
            self._on_grad(param, bucket_index, segment_index, slot_index)

        return hook

    def _on_grad(self, p: nn.Parameter, bucket_index: int, segment_index: int, slot_index: int) -> None:
        grad = p.grad
        if grad is None:
            return
        b = self.buckets[bucket_index]
        seg = b.segments[segment_index]
        slot = self.layouts[seg.layout].slots[slot_index]
        self._dirty = True
        if not self._reducing:
            # Stages 0/1 between boundaries: accumulate locally in fp32, reduce later.
            acc = self.accum[seg.layout]
            if acc is None:
                acc = self.accum[seg.layout] = torch.zeros(
                    self.layouts[seg.layout].padded_numel, dtype=torch.float32, device=self.device
                )
            acc[slot.offset : slot.end].add_(grad.reshape(-1))
            self._accumulated = True
            p.grad = None
            return
        if not self._callback_queued:
            # Runs once autograd has finished this backward: flush buckets, wait for the collectives.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True
        buf = self._bucket_buffer(b)
        flat = grad.reshape(-1)
        with torch.no_grad():
            for piece in seg.pieces:
                a, z = max(slot.offset, piece.start), min(slot.end, piece.end)
                if a < z:
                    at = piece.offset + a - piece.start
                    buf[at : at + z - a].add_(flat[a - slot.offset : z - slot.offset])
        p.grad = None
        b.pending -= 1
        if b.pending == 0:
            self._launch_ready()

    def _bucket_buffer(self, b: _Bucket) -> torch.Tensor:
        if b.buffer is None:
            seg = b.segments[0]
            acc = self.accum[seg.layout]
            if self._via_accum and acc is not None:
                # Stages 0-1 only, whose buckets never span layouts: the bucket is a view of the accumulator.
                b.buffer = acc[seg.start : seg.end]
            else:
                # A transient fp32 buffer for this bucket only (stage 2, and stage 1 without accumulation).
                b.buffer = torch.zeros(b.numel, dtype=torch.float32, device=self.device)
                b.temp = True
                self.live_bucket_buffers += 1
                self.peak_bucket_buffers = max(self.peak_bucket_buffers, self.live_bucket_buffers)
        return b.buffer

    # ---- launching and finishing ----------------------------------------------------------------------

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, b: _Bucket) -> None:
        if not self._via_accum:
            # Bound the transient bucket memory: at most two buckets in flight.
            while len(self._in_flight) >= 2:
                self._complete(self._in_flight.popleft())
        buf = self._bucket_buffer(b)
        if self.pre != 1.0 and self._communicate:
            buf.mul_(self.pre)
        async_op = self.overlap_comm
        if self.world_size == 1 or not self._communicate:
            works = []
        elif self.collective == "all_reduce":
            works = [dist.all_reduce(buf, group=self.group, async_op=async_op)]
        else:
            works = []
            for r, (lo, hi) in enumerate(b.owner_spans):
                if lo < hi:
                    dst = r if self.group is None else dist.get_global_rank(self.group, r)
                    works.append(dist.reduce(buf[lo:hi], dst=dst, group=self.group, async_op=async_op))
        b.works = [w for w in works if w is not None]
        b.launched = True
        if async_op:
            self._in_flight.append(b)
            self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))
        else:
            # overlap_comm=false: the collective already ran; finish the bucket now, which also frees a
            # stage-2 bucket buffer before the next one fills (as DeepSpeed reduces in the hook).
            self._complete(b)

    def _complete(self, b: _Bucket) -> None:
        for w in b.works:
            w.wait()
        b.works = []
        buf = b.buffer
        assert buf is not None
        if self.stage == 0:
            if self._communicate:
                buf.mul_(self.post)
        else:
            # Only this rank's pieces of the bucket matter from here on.
            lo, hi = b.owner_spans[self.rank]
            if lo < hi:
                buf[lo:hi].mul_(self.post)
            if b.temp:
                for seg in b.segments:
                    P = self.layouts[seg.layout].partition_numel
                    for piece in seg.pieces:
                        if piece.owner == self.rank:
                            n = piece.end - piece.start
                            at = piece.start - self.rank * P
                            self.part_grads[seg.layout][at : at + n].add_(buf[piece.offset : piece.offset + n])
        if b.temp:
            self.live_bucket_buffers -= 1
        b.buffer = None

    def _finish_backward(self) -> None:
        unused = [b for b in self.buckets if b.pending > 0]
        if unused and not self.ignore_unused:
            names = [
                self.layouts[seg.layout].slots[s].name
                for b in unused
                for seg in b.segments
                for s in seg.slots
                if self.layouts[seg.layout].params[s].requires_grad
            ]
            raise RuntimeError(
                f"parameters received no gradient in this backward: {names[:10]} "
                f"(set zero_optimization.ignore_unused_parameters=true to treat them as zero)"
            )
        # Parameters without a gradient count as zero (their accumulator region stays as it is).
        for b in self.buckets:
            b.pending = 0
        self._launch_ready()
        while self._in_flight:
            self._complete(self._in_flight.popleft())
        self._reducing = False
