"""Which top-level ds_config keys exist, and what zero-all does with each.

DeepSpeed silently ignores top-level keys it does not know, so a typo such as
``"gradient_acumulation_steps"`` trains with the wrong numbers. zero-all makes an unknown
key an error (with a near-miss suggestion), but accepts, with one warning listing them, the
keys DeepSpeed knows and zero-all does not implement yet, so existing configs still start.
(Read from DeepSpeed's deepspeed/runtime/constants.py and config.py.)
"""

from __future__ import annotations

import difflib

__all__ = ["IMPLEMENTED_KEYS", "KEY_ALIASES", "NOT_IMPLEMENTED_KEYS", "suggest"]

# Keys zero-all reads; each maps to a field of zero_all.config.model.ZeroAllConfig.
IMPLEMENTED_KEYS: frozenset[str] = frozenset(
    {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "steps_per_print",
        "wall_clock_breakdown",
        "memory_breakdown",
        "prescale_gradients",
        "gradient_predivide_factor",
        "gradient_allreduce_op",
        "optimizer",
        "scheduler",
        "fp16",
        "bf16",
        "zero_optimization",
        "aio",
        "activation_checkpointing",
        "pipeline",
        "tensorboard",
        "csv_monitor",
        "wandb",
        "comet",
        "data_types",
        "seed",
        "dataloader_drop_last",
        "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer",
    }
)

# Old spellings DeepSpeed still accepts, mapped to the key zero-all reads.
KEY_ALIASES: dict[str, str] = {"bfloat16": "bf16"}

# Keys DeepSpeed knows that zero-all accepts and ignores (one warning lists them).
NOT_IMPLEMENTED_KEYS: frozenset[str] = frozenset(
    {
        "amp",
        "autotuning",
        "checkpoint",
        "comms_logger",
        "communication_data_type",
        "compile",
        "compression_training",
        "curriculum_learning",
        "data_efficiency",
        "disable_allgather",
        "dump_state",
        "eigenvalue",
        "elasticity",
        "flops_profiler",
        "graph_harvesting",
        "hybrid_engine",
        "nebula",
        "progressive_layer_drop",
        "quantize_training",
        "seq_parallel_comm_data_type",
        "sequence_parallel_size",
        "sparse_attention",
        "sparse_gradients",
        "tensor_parallel",
        "timers",
        "torch_autocast",
        "use_data_before_expert_parallelism",
        "vocabulary_size",
        "weight_quantization",
    }
)


def suggest(key: str, candidates: frozenset[str] | set[str] | list[str]) -> str:
    """`` (did you mean 'x'?)`` for a near-miss spelling, else ``""``."""
    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""
