"""Fused unscale + global gradient norm + overflow check + clip, in two passes over the gradients.

``torch.amp.GradScaler.unscale_`` followed by ``torch.nn.utils.clip_grad_norm_`` reads and
writes every gradient twice and reads it once more (unscale: read+write, norm: read,
clip: read+write). Here:

1. one read-only pass: per-tensor norms of the *scaled* gradients (``torch._foreach_norm``,
   accumulated in fp32 so an fp16 gradient times 2**16 cannot overflow the norm itself);
   their combination is the global norm, and it is inf/nan exactly when some gradient holds
   an inf/nan (or, for fp32 gradients, when the sum of squares itself overflows fp32: also a
   step that must not be taken);
2. one read+write pass: gradients times ``inv_scale * clip_coef`` (``torch._foreach_mul_``).

Why the numbers equal torch's: loss scales are powers of two, so ``norm(g * s) == norm(g) * s``
and ``g * (inv_scale * coef) == (g * inv_scale) * coef`` exactly in floating point; the clip
coefficient is computed as torch computes it (``max_norm / (norm + 1e-6)`` in fp32, clamped
to 1). Tests compare bit for bit with GradScaler + clip_grad_norm_.

Across ranks: each rank passes only the gradients it owns (``sharded=True``, ZeRO), the
norms' p-th powers are summed over the group (max for the inf-norm), so every rank gets the
same global norm and hence the same overflow decision. With ``sharded=False`` (every rank
holds the same full gradients, as after DDP's all-reduce) the norm stays local and only the
overflow flag is agreed.

Model parallelism (pipeline stages, tensor-parallel shards): one replica's gradients are spread
over a ``model_parallel_group`` as well, so the p-th powers are also summed over it. Gradients
that several model-parallel ranks hold identically (a tensor-parallel layer's replicated bias or
layer norm, a tied embedding's copy on a later pipeline stage) are passed as ``replicated`` by
every rank but the one that counts them: they are unscaled and clipped like the others and
checked for inf/nan, but left out of the norm, so each element counts once (Megatron's and
DeepSpeed's rule).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from amp_scaler._dist import ProcessGroup, all_reduce_max_flag, group_size, reduce_device

__all__ = ["clip_factor", "global_grad_norm", "unscale_and_clip_"]


def _group(tensors: Iterable[torch.Tensor | None]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def _local_norm(groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]], norm_type: float) -> torch.Tensor:
    """Norm of this rank's tensors as an fp32 0-d tensor (on the first group's device, or CPU)."""
    per_tensor: list[torch.Tensor] = []
    device = torch.device("cpu")
    for i, ((dev, dtype), ts) in enumerate(groups.items()):
        if i == 0:
            device = dev
        # fp16/bf16 accumulate in fp32 (a scaled fp16 norm easily exceeds 65504); fp64 stays fp64.
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
        norms = torch._foreach_norm(ts, norm_type, dtype=acc)
        per_tensor.extend(n.to(device=device, dtype=torch.float32) for n in norms)
    if not per_tensor:
        return torch.zeros((), dtype=torch.float32, device=device)
    # The same combination clip_grad_norm_ uses: the norm of the per-tensor norms.
    return torch.linalg.vector_norm(torch.stack(per_tensor), norm_type)


def _global_norm(
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]],
    norm_type: float,
    process_group: ProcessGroup,
    sharded: bool,
    model_parallel_group: ProcessGroup = None,
    replicated: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    local = _local_norm(groups, norm_type)
    if replicated:
        # Not counted (another rank counts the same values) but an inf/nan in them must still surface:
        # 0 * finite is 0, 0 * inf or 0 * nan is nan.
        local = local + 0.0 * _local_norm(replicated, norm_type).to(local.device)
    reduce_over = []
    if sharded and group_size(process_group) > 1:
        reduce_over.append(process_group)
    if model_parallel_group is not None and group_size(model_parallel_group) > 1:
        reduce_over.append(model_parallel_group)
    if not reduce_over:
        return local
    if math.isinf(norm_type):
        # MAX need not propagate nan: make every non-finite value +inf first.
        t = torch.nan_to_num(local, nan=math.inf).reshape(1)
        for g in reduce_over:
            t = t.to(reduce_device(g, like=local))
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g)
        return t[0]
    # Sum of p-th powers over ranks; inf/nan on any rank propagate to every rank through the sum.
    t = (local.double() ** norm_type).reshape(1)
    for g in reduce_over:
        t = t.to(reduce_device(g, like=local))
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
    return (t[0] ** (1.0 / norm_type)).float()


def global_grad_norm(
    grads: Iterable[torch.Tensor | None],
    process_group: ProcessGroup = None,
    norm_type: float = 2.0,
    *,
    sharded: bool = True,
    model_parallel_group: ProcessGroup = None,
    replicated: Iterable[torch.Tensor | None] | None = None,
) -> float:
    """The global ``norm_type``-norm of ``grads`` over the group (each rank passes its own shard).

    ``model_parallel_group`` / ``replicated``: as for :func:`unscale_and_clip_`.
    """
    rep = _group(replicated) if replicated is not None else None
    return float(
        _global_norm(_group(grads), float(norm_type), process_group, sharded, model_parallel_group, rep).item()
    )


def clip_factor(total_norm: float, max_norm: float, inv_scale: float = 1.0) -> float:
    """The one factor that unscales and clips: ``inv_scale`` times torch's clip coefficient (1 when off).

    Exactly torch's coefficient ``min(1, max_norm / (norm + 1e-6))`` in fp32 tensor math (``total_norm``
    came from an fp32 tensor, so an fp32 CPU tensor of it holds the same value).
    """
    if max_norm <= 0:
        return inv_scale
    coef = torch.clamp(max_norm / (torch.tensor(total_norm, dtype=torch.float32) + 1e-6), max=1.0)
    return float((coef * inv_scale).item())


def unscale_and_clip_(
    grads: list[torch.Tensor | None],
    inv_scale: float,
    max_norm: float = 0.0,
    process_group: ProcessGroup = None,
    norm_type: float = 2.0,
    *,
    sharded: bool = True,
    model_parallel_group: ProcessGroup = None,
    replicated: list[torch.Tensor | None] | None = None,
) -> tuple[float, bool]:
    """Unscale ``grads`` in place, return the global (unscaled) grad norm and whether it overflowed.

    Args:
        grads: this rank's gradients (``None`` entries are skipped); any mix of devices and
            fp32/fp16/bf16 dtypes.
        inv_scale: ``1 / loss_scale``.
        max_norm: clip to this global norm when > 0 and no overflow (torch's rule:
            multiply by ``min(1, max_norm / (norm + 1e-6))``).
        process_group: the group the gradients are spread over (None: the default group when
            torch.distributed is initialized, else this process alone).
        norm_type: the norm's order (2.0, 1.0, ``inf`` ...).
        sharded: True when each rank holds a different part of the gradients (ZeRO): the norm
            is combined over the group. False when every rank holds the same full gradients
            (plain data parallel after the all-reduce): the norm stays local and only the
            overflow decision is agreed over the group.
        model_parallel_group: the group of ranks that hold the other parts of one model replica
            (pipeline stages x tensor-parallel shards; DeepSpeed's ``mpu.get_model_parallel_group()``):
            the norm is also summed over it. None: no model parallelism.
        replicated: gradients this rank also unscales/clips and checks for inf/nan, but leaves out
            of the norm because another model-parallel rank counts identical copies.

    Returns:
        ``(total_norm, found_inf)``: the global norm of the unscaled gradients (inf/nan when
        found_inf) and whether any rank saw an inf/nan. All ranks return the same values.
        On overflow the gradients are unscaled but not clipped; the caller skips the step.
    """
    if isinstance(max_norm, bool) or max_norm < 0:
        raise ValueError(f"unscale_and_clip_: max_norm must be >= 0 (0 = no clipping), got {max_norm!r}")
    norm_type = float(norm_type)
    inv_scale = float(inv_scale)
    groups = _group(grads)
    rep = _group(replicated) if replicated else None
    scaled_norm = _global_norm(groups, norm_type, process_group, sharded, model_parallel_group, rep)
    # fp32, as torch computes the norm of unscaled fp32 gradients; exact when inv_scale is 2**-k.
    total = scaled_norm * inv_scale
    total_norm = float(total.item())  # the one host sync
    found_inf = not math.isfinite(total_norm)
    if not sharded:
        found_inf = all_reduce_max_flag(found_inf, process_group)
    factor = clip_factor(total_norm, max_norm, inv_scale) if not found_inf else inv_scale
    if factor != 1.0:
        for ts in (*groups.values(), *(rep or {}).values()):
            torch._foreach_mul_(ts, factor)
    return total_norm, found_inf
