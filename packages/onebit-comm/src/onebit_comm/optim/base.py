"""What the three 1-bit optimizers share: who averages gradients, flat layouts, error buffers, checkpoints.

[Note: the gradient-communication protocol] These optimizers do their own gradient communication:
``communicates_gradients = True`` tells a training engine not to all-reduce gradients for them.
Before each step the engine asks :meth:`CompressedOptimizer.needs_averaged_gradients`: when it
returns True (1-bit Adam/LAMB warm-up, 0/1 Adam's variance-update steps) the step wants gradients
averaged in full precision, and the engine may do it (then it calls :meth:`bind_flat_layout`, which
also marks the gradients as averaged by the caller) so that clipping and overflow checks see the
averaged gradient, as DeepSpeed's engine did with ``enable_backward_allreduce``. Used alone, with
local gradients, the optimizer all-reduces them itself on those steps. On every other step the
gradients must be this rank's own (local) ones: the step compresses what it communicates.

[Note: rank-local state] The worker/server error buffers differ from rank to rank and are shaped by
the world size (the padded tensor, one chunk). They live in ``self.state[p]`` (so torch's
``state_dict`` round-trips them), and :meth:`rank_local_state_keys` names them so that a sharded
checkpoint saves them per rank rather than as per-element state. They can only be put back on the
same number of ranks: loading them elsewhere is an error (see :meth:`load_rank_local_state`).

[Note: deferred error updates in the optimizers] On the fused CPU path the step calls the collective
with ``pending=`` (onebit_comm.allreduce, [Note: deferred error updates]), which saves a memory
pass over each error buffer. Between steps the buffers then hold compensated values and
``state[p]["error_pending_scales"]`` the scales that settle them. Everything that hands the state
out settles it first (:meth:`state_dict`, :meth:`rank_local_state`, :meth:`settle_errors`), so
checkpoints hold the exact errors, bitwise those of the exact path; and because the scales live in
the same state dict as the buffers, any path that moves the state moves both. Read
``state[p]["worker_error"]`` directly only after :meth:`settle_errors`. ``defer_error_updates =
False`` (per instance or class) keeps the buffers exact after every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from onebit_comm.allreduce import CommStats, PendingErrors, compressed_allreduce, error_buffers
from onebit_comm.compress import padded_numel

__all__ = ["COMM_BACKEND_NAMES", "CompressedOptimizer"]

# DeepSpeed's comm_backend_name values. Here every one of them means "torch.distributed, whatever its
# backend" (gloo, NCCL, ...): the compressed collective is written with torch.distributed only.
COMM_BACKEND_NAMES = ("nccl", "mpi", "hccl", "compressed", "gloo")
_ERROR_KEYS = ("worker_error", "server_error")
_PENDING_KEY = "error_pending_scales"


class CompressedOptimizer(torch.optim.Optimizer):
    """Base of :class:`OneBitAdam`, :class:`ZeroOneAdam` and :class:`OneBitLamb` (see the module notes)."""

    communicates_gradients = True
    #: Defer the error-buffer updates between steps (see the module notes); False keeps them exact.
    defer_error_updates = True

    def __init__(
        self,
        params: Iterable[Any],
        *,
        name: str,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        bias_correction: bool,
        eps_inside_sqrt: bool,
        max_grad_norm: float,
        amsgrad: bool,
        cuda_aware: bool,
        comm_backend_name: str,
        process_group: dist.ProcessGroup | None,
        settings: dict[str, Any],
    ) -> None:
        """Check and store what every 1-bit optimizer takes; ``settings`` are the subclass's own.

        ``settings`` (e.g. ``freeze_step``) are optimizer-wide: they go into ``defaults`` too, so that
        rebuilding from ``.defaults`` (zero-all does that for an optimizer passed to initialize()) keeps
        them, and become attributes of the same name, which is what the step reads.
        """
        if amsgrad:
            raise ValueError(f"{name}: amsgrad=true is not supported (as in DeepSpeed)")
        if comm_backend_name not in COMM_BACKEND_NAMES:
            raise ValueError(
                f"{name}: comm_backend_name {comm_backend_name!r} is not accepted; accepted: "
                f"{', '.join(COMM_BACKEND_NAMES)} (all run over torch.distributed's own backend)"
            )
        for key, val in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if val < 0:
                raise ValueError(f"{name}: {key} must be >= 0, got {val!r}")
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"{name}: betas must be in [0, 1), got {betas!r}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            max_grad_norm=max_grad_norm,
            eps_inside_sqrt=eps_inside_sqrt,
            **settings,
            cuda_aware=bool(cuda_aware),
            comm_backend_name=comm_backend_name,
        )
        super().__init__(params, defaults)
        for key, val in settings.items():
            setattr(self, key, val)
        self.name = name
        self.eps_inside_sqrt = bool(eps_inside_sqrt)  # accepted, no effect (as in DeepSpeed)
        self.cuda_aware = bool(cuda_aware)  # DeepSpeed's MPI switch; torch.distributed decides here
        self.comm_backend_name = comm_backend_name
        self.process_group = process_group
        on = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(process_group) if on else 1
        self.rank = dist.get_rank(process_group) if on else 0
        self.stats = CommStats()  # bytes this rank sent in compressed all-reduces
        self._caller_averages = False
        self._segments: dict[torch.Tensor, list[tuple[int, int]]] = {}

    # ---- the engine protocol -------------------------------------------------------------------------

    def needs_averaged_gradients(self) -> bool:
        """Whether the next :meth:`step` wants full-precision averaged gradients (else local ones)."""
        raise NotImplementedError

    def bind_flat_layout(self, segments: list[list[tuple[int, int]]]) -> None:
        """Called by a ZeRO wrapper whose param group ``g`` holds one flat tensor packing several parameters.

        ``segments[g]`` lists each packed parameter's ``(offset, numel)``: per-parameter quantities
        (LAMB's trust ratio) are taken per segment, and the tail past the last segment is padding that
        is never communicated. The caller promises to average gradients whenever
        :meth:`needs_averaged_gradients` is True.
        """
        if len(segments) != len(self.param_groups):
            raise ValueError(
                f"{self.name}.bind_flat_layout: {len(segments)} layouts for {len(self.param_groups)} groups"
            )
        for group, segs in zip(self.param_groups, segments, strict=True):
            if len(group["params"]) != 1:
                raise ValueError(f"{self.name}.bind_flat_layout: each group must hold one flat tensor")
            p = group["params"][0]
            end = max((o + n for o, n in segs), default=0)
            if end > p.numel():
                raise ValueError(f"{self.name}.bind_flat_layout: segments reach {end}, the tensor has {p.numel()}")
            self._segments[p] = [(int(o), int(n)) for o, n in segs]
        self._caller_averages = True

    # ---- helpers for the subclasses --------------------------------------------------------------------

    def _first_state(self) -> dict[str, Any]:
        """The state of the first parameter that has one (every parameter steps together), else ``{}``."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    return st
        return {}

    def _next_step(self) -> int:
        """The number of the step :meth:`step` takes next (1 for the first)."""
        return int(self._first_state().get("step", 0)) + 1

    def _grads(self) -> Iterator[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]:
        """``(group, param, fp32 gradient)`` for every parameter that has a gradient; sparse ones are refused."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self.name} does not support sparse gradients")
                yield group, p, (p.grad.float() if p.grad.dtype != torch.float32 else p.grad)

    @staticmethod
    def _run_closure(closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @staticmethod
    def _mask_(group: dict[str, Any], t: torch.Tensor) -> None:
        """Zero the entries DeepSpeed's ``exp_avg_mask`` (a param group key) marks as always zero."""
        mask = group.get("exp_avg_mask")
        if mask is not None:
            t.mul_(mask.to(t.device))

    @staticmethod
    def _adam_update_(
        p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, eps: float, weight_decay: float
    ) -> torch.Tensor:
        """DeepSpeed 0.19's update ``p -= lr * (m / (sqrt(v) + eps) + weight_decay * p)``; returns the update."""
        update = m / (v.sqrt() + eps)
        if weight_decay > 0.0:
            update.add_(p, alpha=weight_decay)
        p.add_(update, alpha=-lr)
        return update

    def segments(self, p: torch.Tensor) -> list[tuple[int, int]]:
        """The parameters packed in ``p``: ``[(offset, numel)]`` (the whole tensor when unbound)."""
        return self._segments.get(p, [(0, p.numel())])

    def real_numel(self, p: torch.Tensor) -> int:
        """Elements of ``p`` that belong to parameters (the rest is padding, never communicated)."""
        return max(o + n for o, n in self.segments(p)) if p in self._segments else p.numel()

    def _average_(self, grad: torch.Tensor) -> torch.Tensor:
        """Full-precision average over ranks, unless the caller already did it."""
        if self.world_size > 1 and not self._caller_averages:
            dist.all_reduce(grad, group=self.process_group)
            grad.mul_(1.0 / self.world_size)
        return grad

    def _compressed_(self, p: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """1-bit average of ``buf`` (shaped like ``p``) over ranks, in place, with ``p``'s error buffers."""
        if self.world_size == 1:
            return buf
        state = self.state[p]
        n = self.real_numel(p)
        if "worker_error" not in state:
            state["worker_error"], state["server_error"] = error_buffers(n, self.world_size, buf.device)
            state.pop(_PENDING_KEY, None)  # fresh buffers hold errors (zeros)
        pending = PendingErrors(state.get(_PENDING_KEY))
        if not self.defer_error_updates:
            pending.settle_(state["worker_error"], state["server_error"], n, self.process_group)
        compressed_allreduce(
            buf.view(-1)[:n],
            state["worker_error"],
            state["server_error"],
            self.process_group,
            stats=self.stats,
            pending=pending if self.defer_error_updates else None,
        )
        if pending.active:
            state[_PENDING_KEY] = pending.scales
        else:
            state.pop(_PENDING_KEY, None)
        return buf

    def _settle(self, p: torch.Tensor) -> None:
        state = self.state.get(p, {})
        if _PENDING_KEY in state:
            PendingErrors(state.pop(_PENDING_KEY)).settle_(
                state["worker_error"], state["server_error"], self.real_numel(p), self.process_group
            )

    def settle_errors(self) -> None:
        """Apply deferred error updates: every ``worker_error`` / ``server_error`` holds its exact errors.

        Called by :meth:`state_dict` and :meth:`rank_local_state`; call it before reading the buffers in
        ``self.state`` directly (see the module notes). Cheap when nothing is pending.
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._settle(p)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with the error buffers settled first (they hold the exact errors)."""
        self.settle_errors()
        return super().state_dict()

    def _reset_errors(self, p: torch.Tensor) -> None:
        state = self.state[p]
        state.pop(_PENDING_KEY, None)
        for k in _ERROR_KEYS:
            if k in state:
                state[k].zero_()

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def rank_local_state_keys(self, p: torch.Tensor) -> list[str]:
        """Keys of ``self.state[p]`` that differ per rank (saved per rank); ``"param"`` means ``p`` itself."""
        return [k for k in _ERROR_KEYS if k in self.state.get(p, {})]

    def rank_local_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """This rank's rank-local tensors for ``p`` (see :meth:`rank_local_state_keys`), error buffers settled."""
        self._settle(p)
        state = self.state.get(p, {})
        return {k: (p.detach() if k == "param" else state[k]) for k in self.rank_local_state_keys(p)}

    def load_rank_local_state(
        self, p: torch.Tensor, tensors: dict[str, torch.Tensor] | None, saved_world_size: int, saved_keys: list[str]
    ) -> None:
        """Put back :meth:`rank_local_state` for ``p``; ``tensors`` is None when saved on another world size.

        Raises ValueError when the checkpoint holds rank-local state (error-feedback buffers, 0/1
        Adam's unsynchronised local steps) that cannot be carried to ``self.world_size`` ranks.
        """
        if not saved_keys:
            return
        if tensors is None or saved_world_size != self.world_size:
            raise ValueError(
                f"{self.name}: this checkpoint was saved on {saved_world_size} ranks in the compressed phase; its "
                f"per-rank state ({', '.join(saved_keys)}) exists once per rank and cannot be resharded to "
                f"{self.world_size} ranks. Resume on {saved_world_size} ranks, or load the model only "
                f"(load_optimizer_states=False)"
            )
        state = self.state[p]
        state.pop(_PENDING_KEY, None)  # the buffers put back hold errors
        for k in saved_keys:
            t = tensors[k]
            if k == "param":
                with torch.no_grad():
                    p.copy_(t)
            else:
                state[k] = t.to(device=p.device, dtype=torch.float32).clone()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, then a check that saved error buffers fit this world size (else a clear error)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                if "worker_error" in st:
                    want = padded_numel(self.real_numel(p), self.world_size)
                    if st["worker_error"].numel() != want:
                        raise ValueError(
                            f"{self.name}.load_state_dict: the error-feedback buffers were saved for another world "
                            f"size ({st['worker_error'].numel()} elements, {want} expected on {self.world_size} "
                            f"ranks); they cannot be resharded: resume on the saving world size"
                        )
