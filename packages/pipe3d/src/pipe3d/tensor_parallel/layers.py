"""Megatron-style tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

Initialisation: every rank builds the *full* layer exactly as its dense torch counterpart would
(``nn.Linear`` / ``nn.Embedding`` under the same seed) and keeps its slice (Megatron's CPU
initialisation). So ``torch.manual_seed(s); ColumnParallelLinear(a, b)`` holds the rows of
``torch.manual_seed(s); nn.Linear(a, b)`` that belong to this rank, and a model built with the
same seeds equals its dense version; the full matrix exists only while the layer is built.

Sequence parallelism (``sequence_parallel=True``): outside the tensor-parallel regions the
activations are split along the sequence (``[batch, seq/t, hidden]``); a column-parallel layer
all-gathers the sequence first (its backward reduce-scatters), a row-parallel layer
reduce-scatters its output instead of all-reducing it. Layer norms in those regions see part of
the sequence, so their parameters' gradients must be summed over the group:
:class:`SequenceParallelLayerNorm` does it inside autograd.

[Note: which parameters are split] A parameter that holds only this rank's slice carries
``tensor_model_parallel = True`` (Megatron's attribute, which DeepSpeed's
``is_model_parallel_parameter`` reads): column-parallel weights and biases, row-parallel weights,
vocab-parallel embeddings. The others (a row-parallel bias, layer norms) are replicated: every
tensor-parallel rank holds the same values and the same gradient, so a global gradient norm
counts them on tensor-parallel rank 0 only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipe3d.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
    tp_rank,
    tp_world_size,
)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "SequenceParallelLayerNorm", "VocabParallelEmbedding"]


def _split(t: torch.Tensor) -> nn.Parameter:
    """This rank's slice as a parameter marked as split (see [Note: which parameters are split])."""
    p = nn.Parameter(t.detach().clone())
    p.tensor_model_parallel = True  # type: ignore[attr-defined]
    return p


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts != 0:
        raise ValueError(f"{what} ({n}) must be divisible by the tensor-parallel size ({parts})")
    return n // parts


class ColumnParallelLinear(nn.Module):
    """``Y = X Aᵀ + b`` with ``A`` split by output rows: rank ``r`` computes outputs ``r·out/t .. (r+1)·out/t``.

    Args:
        input_size / output_size: the dense layer's sizes.
        bias: add a (split) bias.
        gather_output: all-gather the outputs (False: leave them split for a RowParallelLinear).
        group: the tensor-parallel process group (None: the default group).
        sequence_parallel: the input is split along the sequence (all-gathered here).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        group: Any = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.group = group
        self.world = tp_world_size(group)
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = _divide(output_size, self.world, "output_size")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: sequence_parallel needs gather_output=False")
        dense = nn.Linear(input_size, output_size, bias=bias)
        lo = tp_rank(group) * self.output_size_per_partition
        hi = lo + self.output_size_per_partition
        self.weight = _split(dense.weight[lo:hi])
        self.bias = _split(dense.bias[lo:hi]) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of this rank's rows (all of them with ``gather_output``)."""
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group)
        else:
            x = copy_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size} (this rank {self.output_size_per_partition})"


class RowParallelLinear(nn.Module):
    """``Y = X Aᵀ + b`` with ``A`` split by input columns; the partial products are summed over the group.

    Args:
        input_size / output_size: the dense layer's sizes.
        bias: add a bias (replicated, added once after the sum).
        input_is_parallel: the input is already split along its last dimension (a ColumnParallelLinear's
            output with ``gather_output=False``); else it is split here.
        group: the tensor-parallel process group.
        sequence_parallel: reduce-scatter the output along the sequence instead of all-reducing it.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        group: Any = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.group = group
        self.world = tp_world_size(group)
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = _divide(input_size, self.world, "input_size")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        dense = nn.Linear(input_size, output_size, bias=bias)
        lo = tp_rank(group) * self.input_size_per_partition
        hi = lo + self.input_size_per_partition
        self.weight = _split(dense.weight[:, lo:hi])
        self.bias = nn.Parameter(dense.bias.detach().clone()) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense layer's output (split along the sequence with ``sequence_parallel``)."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.group)
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(partial, self.group)
        else:
            y = reduce_from_tensor_parallel_region(partial, self.group)
        if self.bias is not None:
            bias = copy_to_tensor_parallel_region(self.bias, self.group) if self.sequence_parallel else self.bias
            y = y + bias
        return y

    def extra_repr(self) -> str:
        return f"in={self.input_size} (this rank {self.input_size_per_partition}), out={self.output_size}"


class VocabParallelEmbedding(nn.Module):
    """An embedding whose vocabulary rows are split over the group; lookups are summed across it.

    Token ids outside this rank's rows give zeros here and their vector on the owning rank, so the
    all-reduce yields the dense lookup.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Any = None) -> None:
        super().__init__()
        self.group = group
        self.world = tp_world_size(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per = _divide(num_embeddings, self.world, "num_embeddings")
        self.vocab_start = tp_rank(group) * per
        self.vocab_end = self.vocab_start + per
        dense = nn.Embedding(num_embeddings, embedding_dim)
        self.weight = _split(dense.weight[self.vocab_start : self.vocab_end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The dense embedding of ``ids``."""
        if self.world == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)


class SequenceParallelLayerNorm(nn.LayerNorm):
    """LayerNorm over sequence-split activations; its parameters' gradients are summed over the group."""

    def __init__(self, normalized_shape: Any, eps: float = 1e-5, group: Any = None, **kwargs: Any) -> None:
        super().__init__(normalized_shape, eps=eps, **kwargs)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm; the backward all-reduces the weight and bias gradients (each rank saw part of the sequence)."""
        w = copy_to_tensor_parallel_region(self.weight, self.group) if self.weight is not None else None
        b = copy_to_tensor_parallel_region(self.bias, self.group) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
