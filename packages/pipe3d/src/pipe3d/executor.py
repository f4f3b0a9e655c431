"""Run one stage's instruction list (from :mod:`pipe3d.schedule`) over one batch of micro-batches.

The executor owns the per-batch buffers (each micro-batch chunk's inputs, outputs and loss until
its backward), loads data on the first and last virtual stages, and calls
``backward(tensor, boundary)`` for every backward, so the optimizer that owns the gradients
(zero-shard's, or plain autograd) decides what a backward does.

[Note: injecting gradients] A stage that is not last back-propagates gradients it received,
not a loss. Optimizers such as zero-shard's expose ``backward(loss)`` only (they scale the loss
and run their reduction around it), so the received gradients are wrapped as a scalar:
:func:`inject_grads` returns a zero whose backward hands exactly ``grads`` to ``tensors``,
whatever gradient arrives from above. A loss scale applied to that scalar is therefore not
applied twice: the received gradients already carry the last stage's scaled loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from pipe3d.p2p import P2P, LocalP2P, PendingRecv, as_tuple
from pipe3d.schedule import (
    Backward,
    Forward,
    PipeSchedule,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
)

__all__ = ["DEFAULT_RECV_AHEAD", "BatchStats", "PipelineExecutor", "inject_grads"]

# Receives kept posted ahead of use (see [Note: posting receives early] in pipe3d.p2p). Idle A/B on
# the 2-core VM, interleaved 1F1B: 1 ahead bubble 0.149, 2: 0.122, 4: 0.116, 8: 0.107.
DEFAULT_RECV_AHEAD = 8


class _InjectGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, n: int, *tensors_and_grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.grads = tensors_and_grads[n:]
        ctx.n = n
        return torch.zeros((), dtype=torch.float32, device=tensors_and_grads[0].device)

    @staticmethod
    def backward(ctx: Any, _ignored: torch.Tensor) -> Any:  # type: ignore[override]
        grads = ctx.grads
        ctx.grads = None
        return (None, *grads, *([None] * ctx.n))


def inject_grads(tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """A scalar whose backward gives ``grads[i]`` to ``tensors[i]`` (see [Note: injecting gradients])."""
    if len(tensors) != len(grads):
        raise ValueError(f"inject_grads: {len(tensors)} tensors but {len(grads)} gradients")
    for t, g in zip(tensors, grads, strict=True):
        if tuple(t.shape) != tuple(g.shape):
            raise RuntimeError(f"gradient of shape {list(g.shape)} received for a tensor of shape {list(t.shape)}")
    return _InjectGrads.apply(len(tensors), *tensors, *[g.detach() for g in grads])


def _to(x: Any, device: torch.device) -> Any:
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return tuple(_to(v, device) for v in x)
    return x


class BatchStats:
    """Timings and memory of the last batch on this stage (for the benchmark and the bubble)."""

    def __init__(self, chunks: int = 1) -> None:
        self.wall = 0.0
        self.busy = 0.0
        self.forward = 0.0
        self.backward = 0.0
        # Per local model chunk (virtual stage): for pipe3d.schedule.simulate at measured times.
        self.forward_by_chunk = [0.0] * chunks
        self.backward_by_chunk = [0.0] * chunks
        self.peak_activation_bytes = 0
        self.recvs = 0  # receives this batch
        self.recvs_posted_ahead = 0  # of which posted before the instruction that needed them

    @property
    def bubble(self) -> float:
        """Fraction of the batch's wall time this stage spent outside forward/backward compute."""
        return 1.0 - self.busy / self.wall if self.wall > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The figures as a plain dict."""
        return {
            "wall": self.wall,
            "busy": self.busy,
            "forward": self.forward,
            "backward": self.backward,
            "forward_by_chunk": list(self.forward_by_chunk),
            "backward_by_chunk": list(self.backward_by_chunk),
            "bubble": self.bubble,
            "peak_activation_bytes": self.peak_activation_bytes,
        }


class _SavedBytes:
    """saved_tensors_hooks that count the bytes autograd keeps for one micro-batch chunk."""

    def __init__(self) -> None:
        self.nbytes = 0
        self._seen: set[int] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.nbytes += t.untyped_storage().nbytes()
        return t

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


class PipelineExecutor:
    """Runs a schedule on this stage for one batch; see the module docstring.

    Args:
        module: the :class:`~pipe3d.module.PipelineModule` (its ``forward_chunk`` and ``loss_fn``).
        stage / num_stages / chunks: where this rank sits.
        p2p: the :class:`~pipe3d.p2p.P2P` for this pipeline (None with one stage).
        device: where data is moved.
        measure_memory: count saved activation bytes (costs a hook per saved tensor).
        recv_ahead: how many receives to keep posted ahead of the instruction that needs them
            (see [Note: posting receives early] in :mod:`pipe3d.p2p`); 0 posts each at its instruction.
            Each costs one buffer of a stage boundary's activations or gradients.
    """

    def __init__(
        self,
        module: Any,
        stage: int,
        num_stages: int,
        chunks: int,
        p2p: P2P | LocalP2P | None,
        device: torch.device,
        measure_memory: bool = False,
        recv_ahead: int = DEFAULT_RECV_AHEAD,
    ) -> None:
        self.module = module
        if recv_ahead < 0:
            raise ValueError(f"recv_ahead must be >= 0, got {recv_ahead}")
        self.recv_ahead = int(recv_ahead)
        self.stage, self.num_stages, self.chunks = stage, num_stages, chunks
        self.p2p = p2p
        self.device = device
        self.measure_memory = measure_memory
        self.stats = BatchStats()

    def _vs(self, chunk: int) -> int:
        return chunk * self.num_stages + self.stage

    def run(
        self,
        schedule: PipeSchedule,
        data_iter: Iterator[Any] | None,
        backward: Callable[[torch.Tensor, bool], None] | None,
        *,
        train: bool = True,
        keep_outputs: bool = False,
    ) -> tuple[list[torch.Tensor], list[Any]]:
        """Run ``schedule``'s program for this stage; returns (losses, outputs) of the last virtual stage.

        ``backward(tensor, boundary)`` is called for every Backward (boundary False); None with
        ``train=False``. Losses are detached; ``outputs`` are kept only with ``keep_outputs``.
        """
        m = schedule.micro_batches
        last_vs = self.num_stages * self.chunks - 1
        inputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        outputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        losses: dict[int, torch.Tensor] = {}
        labels: dict[int, Any] = {}
        out_grads: dict[tuple[int, int], list[torch.Tensor]] = {}
        kept: list[Any] = []
        saved_bytes: dict[tuple[int, int], int] = {}
        live = peak = 0
        stats = self.stats = BatchStats(self.chunks)
        t_start = time.perf_counter()

        def load(mb: int) -> Any:
            if data_iter is None:
                raise RuntimeError(
                    f"stage {self.stage} needs the data iterator (the first and the last stage read micro-batches)"
                )
            try:
                batch = next(data_iter)
            except StopIteration:
                raise RuntimeError(
                    f"stage {self.stage}: the data iterator ran out at micro-batch {mb} of {m}"
                ) from None
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    "a pipeline micro-batch must be a pair (inputs, labels); "
                    f"got {type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of {len(batch)}'}"
                )
            return _to(batch[0], self.device), _to(batch[1], self.device)

        program = schedule.steps(self.stage)
        recvs = [i for i, ins in enumerate(program) if isinstance(ins, (RecvActivation, RecvGrad))]
        posted: dict[int, PendingRecv] = {}
        next_recv = 0  # index into `recvs` of the next receive to post, in program order

        def post_ahead(i: int) -> None:
            # Receives are posted strictly in program order (the transports match them in order);
            # one whose description is not known yet (first batch) stops the posting until later.
            nonlocal next_recv
            if not isinstance(self.p2p, P2P):
                return
            while next_recv < len(recvs) and len(posted) < self.recv_ahead:
                j = recvs[next_recv]
                if j < i:  # already received at its own instruction
                    next_recv += 1
                    continue
                ins_j = program[j]
                vs_j = self._vs(ins_j.chunk)
                if isinstance(ins_j, RecvActivation):
                    pending = self.p2p.post_recv_activations(vs_j)
                else:
                    pending = self.p2p.post_recv_grads(vs_j)
                if pending is None:
                    return
                posted[j] = pending
                next_recv += 1
                stats.recvs_posted_ahead += j > i

        stats.recvs = len(recvs)
        for i, ins in enumerate(program):
            mb, c = ins.micro_batch, ins.chunk
            vs = self._vs(c)
            post_ahead(i)
            if isinstance(ins, RecvActivation):
                assert self.p2p is not None
                pending = posted.pop(i, None)
                inputs[(mb, c)] = tuple(pending.wait()) if pending is not None else self.p2p.recv_activations(vs)
            elif isinstance(ins, Forward):
                if vs == 0:
                    x, y = load(mb)
                    inputs[(mb, c)] = x if isinstance(x, tuple) else (x,)
                    labels[mb] = y
                elif vs == last_vs and mb not in labels:
                    labels[mb] = load(mb)[1]
                x = inputs[(mb, c)]
                t0 = time.perf_counter()
                counter = _SavedBytes() if (self.measure_memory and train) else None
                if counter is not None:
                    with counter.hooks():
                        out = self.module.forward_chunk(c, x if len(x) > 1 else x[0])
                else:
                    out = self.module.forward_chunk(c, x if len(x) > 1 else x[0])
                if vs == last_vs:
                    y = labels.pop(mb)
                    if keep_outputs:
                        kept.append(out.detach() if torch.is_tensor(out) else out)
                    loss = self.module.loss_fn(out, y) if self.module.loss_fn is not None else out
                    if not (torch.is_tensor(loss) and loss.numel() == 1):
                        raise ValueError(
                            "the last stage must produce a scalar loss (give PipelineModule a loss_fn, or make "
                            f"the last layer return one); got {type(loss).__name__}"
                            + (f" of shape {list(loss.shape)}" if torch.is_tensor(loss) else "")
                        )
                    losses[mb] = loss
                    outputs[(mb, c)] = (loss,)
                else:
                    outputs[(mb, c)] = as_tuple(out)
                dt = time.perf_counter() - t0
                stats.forward += dt
                stats.forward_by_chunk[c] += dt
                if not train:
                    inputs.pop((mb, c), None)
                if counter is not None:
                    nbytes = counter.nbytes + sum(t.untyped_storage().nbytes() for t in outputs[(mb, c)])
                    saved_bytes[(mb, c)] = nbytes
                    live += nbytes
                    peak = max(peak, live)
            elif isinstance(ins, SendActivation):
                assert self.p2p is not None
                self.p2p.send_activations(outputs[(mb, c)], vs)
                if not train:
                    outputs.pop((mb, c))
            elif isinstance(ins, RecvGrad):
                assert self.p2p is not None
                pending = posted.pop(i, None)
                out_grads[(mb, c)] = pending.wait() if pending is not None else self.p2p.recv_grads(vs)
            elif isinstance(ins, Backward):
                assert backward is not None
                t0 = time.perf_counter()
                outs = outputs.pop((mb, c))
                if vs == last_vs:
                    target = outs[0] / m if m > 1 else outs[0]
                else:
                    needs = [t for t in outs if t.requires_grad and t.is_floating_point()]
                    grads = out_grads.pop((mb, c))
                    target = inject_grads(needs, grads) if needs else None
                if target is not None:
                    backward(target, False)
                dt = time.perf_counter() - t0
                stats.backward += dt
                stats.backward_by_chunk[c] += dt
                live -= saved_bytes.pop((mb, c), 0)
            elif isinstance(ins, SendGrad):
                assert self.p2p is not None
                xs = inputs.pop((mb, c))
                grads = [
                    (t.grad if t.grad is not None else torch.zeros_like(t))
                    for t in xs
                    if t.requires_grad and t.is_floating_point()
                ]
                self.p2p.send_grads(grads, vs)
            else:  # pragma: no cover - schedules only produce the kinds above
                raise TypeError(f"unknown instruction {ins!r}")
            if isinstance(ins, Backward) and vs == 0:
                inputs.pop((mb, c), None)
        if self.p2p is not None:
            self.p2p.wait_sends()
        stats.wall = time.perf_counter() - t_start
        stats.busy = stats.forward + stats.backward
        stats.peak_activation_bytes = peak
        return [losses[i].detach() for i in sorted(losses)], kept
