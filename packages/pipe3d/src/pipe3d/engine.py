"""``PipelineEngine``: train and evaluate a :class:`~pipe3d.module.PipelineModule` batch by batch.

``train_batch(data_iter)`` runs the schedule over ``micro_batches`` micro-batches (forward,
backward, point-to-point), then makes the gradients complete on every rank, and returns the
mean loss (averaged over micro-batches and data-parallel replicas, the same on every rank, as
DeepSpeed's ``train_batch``). Who owns the gradients decides the last part:

* plain mode (``backward=None``): gradients stay in ``.grad``; the engine sums the tied
  weights' gradients over their stages, averages every gradient over the data-parallel group
  and steps ``optimizer`` (any torch optimizer) when one is given.
* delegated mode (``backward=fn``, what zero-all uses): every backward is ``fn(tensor,
  boundary)``. Micro-batch backwards pass ``boundary=False``; at the end one more backward with
  ``boundary=True`` gives every trainable parameter its tied-weight gradient (or zero), so an
  optimizer that reduces at the accumulation boundary (ZeRO-1 over the data axis) reduces once
  per batch. The caller steps its optimizer afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from pipe3d.executor import DEFAULT_RECV_AHEAD, BatchStats, PipelineExecutor, inject_grads
from pipe3d.module import PipelineModule
from pipe3d.p2p import P2P, LocalP2P
from pipe3d.schedule import InferenceSchedule, PipeSchedule, make_schedule

__all__ = ["PipelineEngine"]


def _as_iterator(data_iter: Any) -> Iterator[Any] | None:
    """The data iterator as given; a re-iterable (a DataLoader, a list) would restart every batch: refused."""
    if data_iter is None or isinstance(data_iter, Iterator):
        return data_iter
    raise TypeError(
        f"data_iter must be an iterator (e.g. iter(loader)), got {type(data_iter).__name__}: a DataLoader or list "
        "passed each batch would start again from its first micro-batch"
    )


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class PipelineEngine:
    """Runs a PipelineModule's schedule on this rank; see the module docstring.

    Args:
        module: the PipelineModule (built on every rank with the same arguments).
        micro_batches: micro-batches per ``train_batch`` (DeepSpeed: ``gradient_accumulation_steps``).
        schedule: ``"1f1b"`` (default, DeepSpeed's), ``"gpipe"`` or ``"interleaved"`` (needs
            ``module.num_chunks > 1`` and ``micro_batches`` a multiple of the stages).
        optimizer: a torch optimizer stepped by :meth:`train_batch` in plain mode (None: don't step).
        backward: ``fn(tensor, boundary)`` for delegated mode (see the module docstring).
        p2p_timeout: seconds a receive waits for its peer before raising.
        measure_memory: record each stage's peak saved-activation bytes in :attr:`stats`.
        recv_ahead: receives kept posted ahead of the instruction that needs them (see
            :class:`pipe3d.executor.PipelineExecutor`); each holds one stage-boundary tensor.
    """

    def __init__(
        self,
        module: PipelineModule,
        micro_batches: int,
        *,
        schedule: str | PipeSchedule = "1f1b",
        optimizer: torch.optim.Optimizer | None = None,
        backward: Callable[[torch.Tensor, bool], None] | None = None,
        p2p_timeout: float = 300.0,
        measure_memory: bool = False,
        recv_ahead: int = DEFAULT_RECV_AHEAD,
    ) -> None:
        if not isinstance(module, PipelineModule):
            raise TypeError(f"PipelineEngine needs a PipelineModule, got {type(module).__name__}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if optimizer is not None and backward is not None:
            raise ValueError("give optimizer= (plain mode) or backward= (delegated mode), not both")
        self.module = module
        self.micro_batches = int(micro_batches)
        self.num_stages = module.num_stages
        self.stage_id = module.stage_id
        self.chunks = module.num_chunks
        if isinstance(schedule, PipeSchedule):
            self.schedule = schedule
        else:
            if module.num_chunks > 1 and str(schedule).lower() != "interleaved":
                raise ValueError(f"the PipelineModule has num_chunks={module.num_chunks}: use schedule='interleaved'")
            self.schedule = make_schedule(schedule, self.micro_batches, self.num_stages, module.num_chunks)
        if (self.schedule.stages, self.schedule.chunks) != (self.num_stages, self.chunks):
            raise ValueError(
                f"schedule {self.schedule} does not fit the module ({self.num_stages} stages, {self.chunks} chunks)"
            )
        self.optimizer = optimizer
        self._backward = backward
        self.grid = module.mpu()
        self.device = _device_of(module)
        self.p2p_timeout = float(p2p_timeout)
        self._p2p = {"train": self._make_p2p(), "eval": self._make_p2p()}
        self._executor = PipelineExecutor(
            module,
            self.stage_id,
            self.num_stages,
            self.chunks,
            self._p2p["train"],
            self.device,
            measure_memory=measure_memory,
            recv_ahead=recv_ahead,
        )
        self.global_steps = 0

    def _make_p2p(self) -> P2P | LocalP2P | None:
        if self.num_stages == 1:
            return LocalP2P() if self.chunks > 1 else None
        grid = self.grid
        return P2P(
            self.stage_id,
            self.num_stages,
            grid.stage_to_global,
            grid.p2p_activation_group,
            grid.p2p_grad_group,
            self.device,
            timeout=self.p2p_timeout,
        )

    @property
    def stats(self) -> BatchStats:
        """Timings and peak activation memory of the last batch on this stage."""
        return self._executor.stats

    def is_first_stage(self) -> bool:
        """Whether this rank holds the first stage."""
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        """Whether this rank holds the last stage."""
        return self.stage_id == self.num_stages - 1

    # ---- training -------------------------------------------------------------------------------------
    def _sync_device(self) -> None:
        """Follow the module if it was moved since construction (received tensors are allocated there)."""
        self.device = _device_of(self.module)
        self._executor.device = self.device
        for p2p in self._p2p.values():
            if isinstance(p2p, P2P):
                p2p.device = self.device

    def forward_backward(self, data_iter: Iterator[Any] | None) -> torch.Tensor:
        """Forward and backward of one batch with complete gradients; no optimizer step. Returns the mean loss."""
        it = _as_iterator(data_iter)
        self.module.train()
        self._sync_device()
        self.module.begin_tied_batch()
        backward = self._backward or (lambda t, boundary: t.backward())
        losses, _ = self._executor.run(self.schedule, it, backward, train=True)
        tied = self.module.end_tied_batch()
        if self._backward is not None:
            self._flush_delegated(tied)
        else:
            self._finish_plain(tied)
        return self._aggregate_loss(losses)

    def train_batch(self, data_iter: Iterator[Any] | None = None) -> torch.Tensor:
        """One optimizer step over ``micro_batches`` micro-batches; returns the mean loss (every rank)."""
        loss = self.forward_backward(data_iter)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        return loss

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def _flush_delegated(self, tied: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The boundary backward: every trainable parameter gets its tied gradient or a zero."""
        assert self._backward is not None
        extra = {id(p): g for p, g in tied}
        params = self._trainable()
        if not params:
            return
        grads = [extra.get(id(p), None) for p in params]
        grads = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads, strict=True)]
        self._backward(inject_grads(params, grads), True)

    def _finish_plain(self, tied: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Tied gradients into ``.grad``, then the data-parallel average of every gradient."""
        with torch.no_grad():
            for p, g in tied:
                p.grad = g.to(p.dtype) if p.grad is None else p.grad.add_(g)
            grid = self.grid
            if grid is None or grid.get_data_parallel_world_size() == 1:
                return
            group, n = grid.get_data_parallel_group(), grid.get_data_parallel_world_size()
            grads = []
            for p in self._trainable():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            # One flat buffer per dtype: one collective instead of one per parameter.
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for g in grads:
                by_dtype.setdefault(g.dtype, []).append(g)
            for gs in by_dtype.values():
                flat = torch.cat([g.reshape(-1) for g in gs])
                dist.all_reduce(flat, group=group)
                flat.div_(n)
                offset = 0
                for g in gs:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()

    def _aggregate_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """Mean over micro-batches (last stage), over data-parallel replicas, broadcast along the pipe."""
        if losses:
            loss = torch.stack([x.float() for x in losses]).mean()
        else:
            loss = torch.zeros((), dtype=torch.float32, device=self.device)
        grid = self.grid
        if grid is None:
            return loss
        if self.is_last_stage() and grid.get_data_parallel_world_size() > 1:
            dist.all_reduce(loss, group=grid.get_data_parallel_group())
            loss /= grid.get_data_parallel_world_size()
        if self.num_stages > 1:
            dist.broadcast(loss, src=grid.stage_to_global(self.num_stages - 1), group=grid.get_pipe_parallel_group())
        return loss

    # ---- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_batch(
        self,
        data_iter: Iterator[Any] | None = None,
        return_logits: bool = False,
        bcast_loss: bool = True,
        num_micro_batches: int | None = None,
    ) -> Any:
        """Forward of ``num_micro_batches`` (default: ``micro_batches``) micro-batches; the mean loss.

        With ``return_logits`` also the last stage's outputs (a list, one per micro-batch; empty on
        other stages). ``bcast_loss=False`` leaves the loss on the last stage only (others get 0).
        """
        it = _as_iterator(data_iter)
        self._sync_device()
        self.module.eval()
        m = self.micro_batches if num_micro_batches is None else int(num_micro_batches)
        schedule = InferenceSchedule(m, self.num_stages, self.chunks)
        executor = PipelineExecutor(
            self.module, self.stage_id, self.num_stages, self.chunks, self._p2p["eval"], self.device
        )
        try:
            losses, outs = executor.run(schedule, it, None, train=False, keep_outputs=return_logits)
        finally:
            self.module.train()
        if bcast_loss:
            loss = self._aggregate_loss(losses)
        else:
            loss = torch.stack(losses).mean() if losses else torch.zeros(())
        return (loss, outs) if return_logits else loss
