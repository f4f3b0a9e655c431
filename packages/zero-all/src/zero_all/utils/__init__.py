"""``zero_all.utils``: DeepSpeed's ``deepspeed.utils`` helpers that user scripts import.

``logger``, ``log_dist``, ``print_dist``, ``see_memory_usage`` (:mod:`zero_all.utils.logging`) and the
``zero_to_fp32`` functions (:mod:`zero_all.utils.zero_to_fp32`).
"""

from zero_all.utils.logging import get_dist_msg, log_dist, logger, print_dist, see_memory_usage
from zero_all.utils.zero_to_fp32 import (
    convert_zero_checkpoint_to_fp32_state_dict,
    get_fp32_state_dict_from_zero_checkpoint,
    load_state_dict_from_zero_checkpoint,
)

__all__ = [
    "convert_zero_checkpoint_to_fp32_state_dict",
    "get_dist_msg",
    "get_fp32_state_dict_from_zero_checkpoint",
    "load_state_dict_from_zero_checkpoint",
    "log_dist",
    "logger",
    "print_dist",
    "see_memory_usage",
]
