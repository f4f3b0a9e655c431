"""``zero_all.ops``: DeepSpeed's ``deepspeed.ops`` optimizer names (``zero_all.ops.adam``)."""

from zero_all.ops import adam

__all__ = ["adam"]
