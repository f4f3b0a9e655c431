"""amp-scaler: fp16 dynamic loss scaling, bf16 mixed precision and fp32 master weights with DeepSpeed's semantics."""

__version__ = "0.1.0"

__all__ = ["__version__"]
