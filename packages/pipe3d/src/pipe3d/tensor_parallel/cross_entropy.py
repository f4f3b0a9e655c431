"""Cross-entropy over vocab-parallel logits, without gathering the vocabulary (Megatron's).

Each rank holds logits for its slice of the vocabulary ``[..., V/t]``. The loss needs the
log-sum-exp over all of ``V`` and the target's logit: both come from all-reduces of per-token
scalars (the max, the sum of exponentials, the target logit), never of ``[..., V]``. The backward
is ``softmax - onehot`` on the local slice, computed from the saved softmax.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pipe3d.tensor_parallel.mappings import tp_rank, tp_world_size

__all__ = ["vocab_parallel_cross_entropy"]


def _all_reduce(x: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    if tp_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        logits = logits.float()
        per = logits.shape[-1]
        start = tp_rank(group) * per
        logits_max = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group)
        shifted = logits - logits_max.unsqueeze(-1)
        outside = (target < start) | (target >= start + per)
        local = (target - start).masked_fill(outside, 0)
        predicted = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        predicted = _all_reduce(predicted, dist.ReduceOp.SUM, group)
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), dist.ReduceOp.SUM, group)
        loss = sum_exp.log() - predicted
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside)
        return loss

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:  # type: ignore[override]
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()
        onehot = torch.zeros_like(grad).scatter_(-1, local.unsqueeze(-1), 1.0)
        grad -= onehot * (~outside).unsqueeze(-1).to(grad.dtype)
        return grad * g.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(
    logits_parallel: torch.Tensor, target: torch.Tensor, group: Any = None
) -> torch.Tensor:
    """Per-token cross-entropy (no reduction) of ``target`` under vocab-split ``logits_parallel``.

    ``logits_parallel``: ``[..., V/t]``, this rank's vocabulary slice (rank ``r`` holds ids
    ``r·V/t .. (r+1)·V/t``, as :class:`~pipe3d.tensor_parallel.VocabParallelEmbedding` and a
    ColumnParallelLinear head with ``gather_output=False`` split them). Take ``.mean()`` for
    ``F.cross_entropy``'s default. Computed in fp32.
    """
    return _VocabParallelCE.apply(logits_parallel, target, group)
