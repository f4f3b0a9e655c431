"""amp-scaler: fp16 dynamic loss scaling, bf16 mixed precision and fp32 master weights with DeepSpeed's semantics.

Public API:

* config sections: :class:`FP16Config` (``"fp16"``), :class:`BF16Config` (``"bf16"``),
  :func:`check_precision` (fp16 and bf16 both on is an error);
* scalers: :class:`DynamicLossScaler`, :class:`StaticLossScaler`, :func:`create_loss_scaler`;
* :func:`unscale_and_clip_`: fused unscale + global grad norm + overflow check + clip;
* :class:`MixedPrecisionOptimizer`: fp16/bf16 model, fp32 master weights (no ZeRO);
* :class:`GradScaler`: ``torch.amp.GradScaler``'s interface with DeepSpeed's rules;
* :func:`cast_floating`: ``fp16.auto_cast`` for model inputs;
* :func:`split_tensors` / :func:`merge_tensors`: pickle-free state (tensors + JSON).
"""

from amp_scaler.cast import cast_floating
from amp_scaler.checkpoint import merge_tensors, split_tensors
from amp_scaler.config import BF16Config, FP16Config, PrecisionConfig, check_precision, parse_bf16, parse_fp16
from amp_scaler.grad_scaler import GradScaler
from amp_scaler.optimizer import MixedPrecisionOptimizer
from amp_scaler.scaler import (
    DynamicLossScaler,
    LossScalerBase,
    LossScaleUnderflowError,
    StaticLossScaler,
    create_loss_scaler,
    has_inf_or_nan,
)
from amp_scaler.unscale import clip_factor, global_grad_norm, unscale_and_clip_

__version__ = "0.1.0"

__all__ = [
    "BF16Config",
    "DynamicLossScaler",
    "FP16Config",
    "GradScaler",
    "LossScaleUnderflowError",
    "LossScalerBase",
    "MixedPrecisionOptimizer",
    "PrecisionConfig",
    "StaticLossScaler",
    "__version__",
    "cast_floating",
    "check_precision",
    "clip_factor",
    "create_loss_scaler",
    "global_grad_norm",
    "has_inf_or_nan",
    "merge_tensors",
    "parse_bf16",
    "parse_fp16",
    "split_tensors",
    "unscale_and_clip_",
]
