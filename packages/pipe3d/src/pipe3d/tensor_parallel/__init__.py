"""Tensor and sequence parallelism (Megatron-style layers); dropout per rank via act-ckpt's RNG tracker.

Dropout inside a parallel region (on split activations) must draw a different mask per rank;
outside, the same mask on every rank. Seed with ``act_ckpt.model_parallel_manual_seed(seed, group)``
and wrap region dropout in ``with act_ckpt.get_rng_tracker().fork():`` — act-ckpt's checkpointing
restores the tracker for the recompute, so checkpointed dropout redraws the same masks.
"""

from pipe3d.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from pipe3d.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelLayerNorm,
    VocabParallelEmbedding,
)
from pipe3d.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "SequenceParallelLayerNorm",
    "VocabParallelEmbedding",
    "copy_to_tensor_parallel_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
    "vocab_parallel_cross_entropy",
]
