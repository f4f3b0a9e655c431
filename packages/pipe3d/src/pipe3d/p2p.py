"""Point-to-point transfer of activations and gradients between pipeline stages.

What travels is a tuple of tensors (one tensor is a tuple of one). Shapes, dtypes and which
tensors need a gradient are negotiated once per channel (the link from one virtual stage to the
next): the first send carries a small int64 header, later sends only the data, and the receiver
allocates from the cached description. A later send whose tensors differ from the negotiated
ones is an error on the sending rank that names both stages and both descriptions (DeepSpeed
assumes fixed shapes too, silently). Gradients need no negotiation: they have the shapes of the
activations that required a gradient, which both sides already know.

Sends are non-blocking (``isend``; the tensor is kept alive until :meth:`P2P.wait_sends`). A receive
can be posted ahead of the instruction that needs it (:meth:`P2P.post_recv_activations`,
:meth:`P2P.post_recv_grads`) and waited for there; waiting has a timeout whose error names this rank,
the peer and the message, instead of hanging.

[Note: posting receives early] gloo (and NCCL) match a send with a posted receive. On gloo a send
whose receive is not posted yet is parked until the receiver asks for it, and is then carried out by
the *sender's* transport thread: on a machine whose cores are busy with the stages' compute, that
thread waits for a core, and the receiver with it (measured: 2.5-3.5 ms for a 128 KiB activation
posted after its send, against 0.6 ms for a gradient whose receive was already waiting). The executor
therefore keeps the next ``recv_ahead`` receives of its program posted (see :class:`pipe3d.executor.PipelineExecutor`).
Activations and gradients use two communicators (see :class:`pipe3d.topology.PipelineParallelGrid`),
and on gloo also distinct tags.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["P2P", "PendingRecv", "TensorMeta"]

_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
_CODE = {d: i for i, d in enumerate(_DTYPES)}
_TAG_META, _TAG_ACT, _TAG_GRAD = 11, 12, 13


@dataclass(frozen=True)
class TensorMeta:
    """Shape, dtype and requires_grad of one tensor crossing a stage boundary."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @staticmethod
    def of(t: torch.Tensor) -> TensorMeta:
        """The description of ``t``."""
        return TensorMeta(tuple(t.shape), t.dtype, bool(t.requires_grad and t.is_floating_point()))


def _encode(metas: Sequence[TensorMeta]) -> torch.Tensor:
    flat = [len(metas)]
    for m in metas:
        flat += [_CODE[m.dtype], int(m.requires_grad), len(m.shape), *m.shape]
    return torch.tensor(flat, dtype=torch.int64)


def _decode(t: torch.Tensor) -> list[TensorMeta]:
    v = t.tolist()
    n, i, out = v[0], 1, []
    for _ in range(n):
        code, rg, nd = v[i : i + 3]
        shape = tuple(v[i + 3 : i + 3 + nd])
        out.append(TensorMeta(shape, _DTYPES[code], bool(rg)))
        i += 3 + nd
    return out


def as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    """Activations as a tuple of tensors; anything else is an error naming what was found."""
    items = x if isinstance(x, (tuple, list)) else (x,)
    for i, t in enumerate(items):
        if not torch.is_tensor(t):
            raise TypeError(f"pipeline stages exchange tensors or tuples of tensors; element {i} is {type(t).__name__}")
    return tuple(items)


class PendingRecv:
    """Receives posted ahead of use (:meth:`P2P.post_recv_activations` / :meth:`P2P.post_recv_grads`).

    :meth:`wait` returns the received tensors (activations keep the sender's ``requires_grad``).
    """

    def __init__(self, p2p: P2P, works: list[Any], tensors: list[torch.Tensor], src_stage: int, what: str) -> None:
        self._p2p, self._works, self._tensors = p2p, works, tensors
        self._src, self._what = src_stage, what

    def wait(self) -> list[torch.Tensor]:
        """Block until every tensor has arrived (or raise naming the rank, the peer and the message)."""
        for work in self._works:
            self._p2p._wait(work, self._src, self._what)
        self._works = []
        return self._tensors


class P2P:
    """Sends and receives between the stages of one pipeline.

    Args:
        stage: this rank's stage; ``stage_to_rank(s)`` the global rank of stage ``s`` in this pipeline.
        num_stages: ``P``.
        activation_group / grad_group: the communicators for each kind (the pipe group is fine on gloo).
        device: where received tensors are allocated.
        timeout: seconds a receive waits before raising.
    """

    def __init__(
        self,
        stage: int,
        num_stages: int,
        stage_to_rank: Any,
        activation_group: Any,
        grad_group: Any,
        device: torch.device,
        timeout: float = 300.0,
    ) -> None:
        self.stage = stage
        self.num_stages = num_stages
        self.stage_to_rank = stage_to_rank
        self.groups = {"act": activation_group, "grad": grad_group}
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout)
        self.meta: dict[int, list[TensorMeta]] = {}  # virtual stage sending -> its outputs' description
        self._pending: list[tuple[Any, Any]] = []
        self.bytes_sent = 0
        self.sends = 0

    # ---- low level -------------------------------------------------------------------------------------
    def _isend(self, t: torch.Tensor, dst_stage: int, kind: str, tag: int) -> None:
        t = t.contiguous()
        work = dist.isend(t, dst=self.stage_to_rank(dst_stage), group=self.groups[kind], tag=tag)
        self._pending.append((work, t))
        self.bytes_sent += t.numel() * t.element_size()
        self.sends += 1

    def _irecv(self, t: torch.Tensor, src_stage: int, kind: str, tag: int) -> Any:
        return dist.irecv(t, src=self.stage_to_rank(src_stage), group=self.groups[kind], tag=tag)

    def _wait(self, work: Any, src_stage: int, what: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as e:
            raise RuntimeError(
                f"pipeline rank {dist.get_rank()} (stage {self.stage}): receiving {what} from stage {src_stage} "
                f"(rank {self.stage_to_rank(src_stage)}) failed or timed out after {self.timeout}: {e}"
            ) from e

    def _post(
        self, metas: Sequence[TensorMeta], src_stage: int, kind: str, tag: int, what: str, *, activations: bool
    ) -> PendingRecv:
        """Allocate a tensor per description and post its receive (activations require a gradient
        where the sender's did; gradients never do)."""
        tensors = [torch.empty(m.shape, dtype=m.dtype, device=self.device) for m in metas]
        works = [self._irecv(t, src_stage, kind, tag) for t in tensors]
        if activations:
            for t, m in zip(tensors, metas, strict=True):
                t.requires_grad_(m.requires_grad)
        return PendingRecv(self, works, tensors, src_stage, what)

    def _recv(self, t: torch.Tensor, src_stage: int, kind: str, tag: int, what: str) -> torch.Tensor:
        self._wait(self._irecv(t, src_stage, kind, tag), src_stage, what)
        return t

    def wait_sends(self) -> None:
        """Wait for every send issued so far (their buffers may be freed afterwards)."""
        for work, _ in self._pending:
            work.wait(self.timeout)
        self._pending.clear()

    # ---- activations -------------------------------------------------------------------------------------
    def send_activations(self, tensors: tuple[torch.Tensor, ...], src_vs: int) -> None:
        """Send ``src_vs``'s outputs to the next virtual stage (on stage ``(src_vs + 1) % P``)."""
        dst = (src_vs + 1) % self.num_stages
        metas = [TensorMeta.of(t) for t in tensors]
        known = self.meta.get(src_vs)
        if known is None:
            header = _encode(metas)
            self._isend(torch.tensor([header.numel()], dtype=torch.int64).to(self.device), dst, "act", _TAG_META)
            self._isend(header.to(self.device), dst, "act", _TAG_META)
            self.meta[src_vs] = metas
        elif known != metas:
            raise RuntimeError(
                f"pipeline rank {dist.get_rank()} (stage {self.stage}): virtual stage {src_vs} now outputs "
                f"{_describe(metas)} but sent {_describe(known)} before; the tensors passed between stages "
                "must keep their shapes and dtypes (pad to a fixed sequence length)"
            )
        for t in tensors:
            self._isend(t.detach(), dst, "act", _TAG_ACT)

    def post_recv_activations(self, dst_vs: int) -> PendingRecv | None:
        """Post the receives of ``dst_vs``'s inputs now; None while their description is not known yet
        (the first batch, whose header must be read first: use :meth:`recv_activations` then)."""
        src_vs = dst_vs - 1
        metas = self.meta.get(src_vs)
        if metas is None:
            return None
        return self._post(metas, src_vs % self.num_stages, "act", _TAG_ACT, "activations", activations=True)

    def recv_activations(self, dst_vs: int) -> tuple[torch.Tensor, ...]:
        """Receive the inputs of virtual stage ``dst_vs`` (float ones that need a gradient require it)."""
        src_vs = dst_vs - 1
        src = src_vs % self.num_stages
        if src_vs not in self.meta:
            n = self._recv(torch.empty(1, dtype=torch.int64, device=self.device), src, "act", _TAG_META, "a header")
            header = torch.empty(int(n.item()), dtype=torch.int64, device=self.device)
            self.meta[src_vs] = _decode(self._recv(header, src, "act", _TAG_META, "a header").cpu())
        pending = self.post_recv_activations(dst_vs)
        assert pending is not None
        return tuple(pending.wait())

    # ---- gradients ---------------------------------------------------------------------------------------
    def send_grads(self, grads: Sequence[torch.Tensor], src_vs: int) -> None:
        """Send the gradients of virtual stage ``src_vs``'s inputs back to the previous virtual stage."""
        for g in grads:
            self._isend(g.detach(), (src_vs - 1) % self.num_stages, "grad", _TAG_GRAD)

    def post_recv_grads(self, dst_vs: int) -> PendingRecv | None:
        """Post the receives of the gradients of ``dst_vs``'s outputs now (None before its first send)."""
        metas = self.meta.get(dst_vs)
        if metas is None:
            return None
        grads = [m for m in metas if m.requires_grad]
        return self._post(grads, (dst_vs + 1) % self.num_stages, "grad", _TAG_GRAD, "gradients", activations=False)

    def recv_grads(self, dst_vs: int) -> list[torch.Tensor]:
        """Receive the gradients of ``dst_vs``'s outputs (one per output that required a gradient)."""
        pending = self.post_recv_grads(dst_vs)
        if pending is None:
            raise RuntimeError(f"stage {self.stage}: gradients for virtual stage {dst_vs} before any activation")
        return pending.wait()


def _describe(metas: Sequence[TensorMeta]) -> str:
    return "(" + ", ".join(f"{list(m.shape)} {str(m.dtype).replace('torch.', '')}" for m in metas) + ")"


class LocalP2P:
    """The :class:`P2P` interface within one process (one stage holding several chunks, ``P = 1``).

    Activations are detached (and require a gradient where the sender's did), so each chunk's
    backward stays separate as it would across ranks.
    """

    def __init__(self) -> None:
        self._act: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self._grad: dict[int, list[list[torch.Tensor]]] = {}
        self.meta: dict[int, list[TensorMeta]] = {}

    def send_activations(self, tensors: tuple[torch.Tensor, ...], src_vs: int) -> None:
        """Queue ``src_vs``'s outputs for ``src_vs + 1``."""
        self.meta[src_vs] = [TensorMeta.of(t) for t in tensors]
        out = tuple(t.detach().requires_grad_(m.requires_grad) for t, m in zip(tensors, self.meta[src_vs], strict=True))
        self._act.setdefault(src_vs, []).append(out)

    def recv_activations(self, dst_vs: int) -> tuple[torch.Tensor, ...]:
        """The oldest queued inputs of ``dst_vs``."""
        return self._act[dst_vs - 1].pop(0)

    def send_grads(self, grads: Sequence[torch.Tensor], src_vs: int) -> None:
        """Queue the gradients of ``src_vs``'s inputs for ``src_vs - 1``."""
        self._grad.setdefault(src_vs - 1, []).append([g.detach() for g in grads])

    def recv_grads(self, dst_vs: int) -> list[torch.Tensor]:
        """The oldest queued gradients of ``dst_vs``'s outputs."""
        return self._grad[dst_vs].pop(0)

    def wait_sends(self) -> None:
        """Nothing is in flight."""
