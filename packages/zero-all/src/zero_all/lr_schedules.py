"""``zero_all.lr_schedules``: DeepSpeed's ``deepspeed.runtime.lr_schedules`` module surface.

The schedule classes (from :mod:`zero_all.schedulers`), DeepSpeed's name constants
(``WARMUP_LR``, ``WARMUP_MIN_LR``, ..., ``VALID_LR_SCHEDULES``), and its command-line helpers:
``add_tuning_arguments(parser)`` adds the ``--lr_schedule``/``--warmup_*``/``--cycle_*``/
``--lr_range_test_*`` flags with DeepSpeed's defaults, and ``get_config_from_args(args)`` turns
them into a ds_config ``"scheduler"`` section.
"""

from __future__ import annotations

import argparse
from typing import Any

from zero_all.schedulers import (
    WARMUP_LINEAR_RATE,
    WARMUP_LOG_RATE,
    LRRangeTest,
    OneCycle,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
)

__all__ = [
    "COS_MIN_RATIO",
    "CYCLE_FIRST_STAIR_COUNT",
    "CYCLE_FIRST_STEP_SIZE",
    "CYCLE_MAX_LR",
    "CYCLE_MAX_MOM",
    "CYCLE_MIN_LR",
    "CYCLE_MIN_MOM",
    "CYCLE_SECOND_STAIR_COUNT",
    "CYCLE_SECOND_STEP_SIZE",
    "DECAY_LR_RATE",
    "DECAY_MOM_RATE",
    "DECAY_STEP_SIZE",
    "EDGE_VALUE",
    "LR_RANGE_TEST",
    "LR_RANGE_TEST_MIN_LR",
    "LR_RANGE_TEST_STAIRCASE",
    "LR_RANGE_TEST_STEP_RATE",
    "LR_RANGE_TEST_STEP_SIZE",
    "LR_SCHEDULE",
    "MID_VALUE",
    "ONE_CYCLE",
    "TOTAL_NUM_STEPS",
    "VALID_LR_SCHEDULES",
    "WARMUP_COSINE_LR",
    "WARMUP_DECAY_LR",
    "WARMUP_LINEAR_RATE",
    "WARMUP_LOG_RATE",
    "WARMUP_LR",
    "WARMUP_MAX_LR",
    "WARMUP_MIN_LR",
    "WARMUP_MIN_RATIO",
    "WARMUP_NUM_STEPS",
    "WARMUP_TYPE",
    "LRRangeTest",
    "OneCycle",
    "WarmupCosineLR",
    "WarmupDecayLR",
    "WarmupLR",
    "add_tuning_arguments",
    "get_config_from_args",
    "get_lr_from_config",
    "override_params",
    "parse_arguments",
]

LR_SCHEDULE = "lr_schedule"
LR_RANGE_TEST = "LRRangeTest"
ONE_CYCLE = "OneCycle"
WARMUP_LR = "WarmupLR"
WARMUP_DECAY_LR = "WarmupDecayLR"
WARMUP_COSINE_LR = "WarmupCosineLR"
VALID_LR_SCHEDULES = [LR_RANGE_TEST, ONE_CYCLE, WARMUP_LR, WARMUP_DECAY_LR, WARMUP_COSINE_LR]

LR_RANGE_TEST_MIN_LR = "lr_range_test_min_lr"
LR_RANGE_TEST_STEP_RATE = "lr_range_test_step_rate"
LR_RANGE_TEST_STEP_SIZE = "lr_range_test_step_size"
LR_RANGE_TEST_STAIRCASE = "lr_range_test_staircase"

EDGE_VALUE = "edge_value"
MID_VALUE = "mid_value"

CYCLE_FIRST_STEP_SIZE = "cycle_first_step_size"
CYCLE_FIRST_STAIR_COUNT = "cycle_first_stair_count"
CYCLE_SECOND_STEP_SIZE = "cycle_second_step_size"
CYCLE_SECOND_STAIR_COUNT = "cycle_second_stair_count"
DECAY_STEP_SIZE = "decay_step_size"

CYCLE_MIN_LR = "cycle_min_lr"
CYCLE_MAX_LR = "cycle_max_lr"
DECAY_LR_RATE = "decay_lr_rate"

CYCLE_MIN_MOM = "cycle_min_mom"
CYCLE_MAX_MOM = "cycle_max_mom"
DECAY_MOM_RATE = "decay_mom_rate"

WARMUP_MIN_LR = "warmup_min_lr"
WARMUP_MAX_LR = "warmup_max_lr"
WARMUP_NUM_STEPS = "warmup_num_steps"
WARMUP_TYPE = "warmup_type"

WARMUP_MIN_RATIO = "warmup_min_ratio"
COS_MIN_RATIO = "cos_min_ratio"

TOTAL_NUM_STEPS = "total_num_steps"

# Which flags feed which schedule (DeepSpeed's override_* functions).
_RANGE_TEST_KEYS = (LR_RANGE_TEST_MIN_LR, LR_RANGE_TEST_STEP_RATE, LR_RANGE_TEST_STEP_SIZE, LR_RANGE_TEST_STAIRCASE)
_ONE_CYCLE_KEYS = (
    CYCLE_FIRST_STEP_SIZE,
    CYCLE_FIRST_STAIR_COUNT,
    CYCLE_SECOND_STEP_SIZE,
    CYCLE_SECOND_STAIR_COUNT,
    DECAY_STEP_SIZE,
    CYCLE_MIN_LR,
    CYCLE_MAX_LR,
    DECAY_LR_RATE,
    CYCLE_MIN_MOM,
    CYCLE_MAX_MOM,
    DECAY_MOM_RATE,
)
_WARMUP_KEYS = (WARMUP_MIN_LR, WARMUP_MAX_LR, WARMUP_NUM_STEPS, WARMUP_TYPE)


def add_tuning_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's "Convergence Tuning" flags (same names and defaults) to ``parser``."""
    g = parser.add_argument_group("Convergence Tuning", "Convergence tuning configurations")
    g.add_argument("--lr_schedule", type=str, default=None, help="LR schedule for training.")
    g.add_argument("--lr_range_test_min_lr", type=float, default=0.001, help="Starting lr value.")
    g.add_argument("--lr_range_test_step_rate", type=float, default=1.0, help="scaling rate for LR range test.")
    g.add_argument("--lr_range_test_step_size", type=int, default=1000, help="training steps per LR change.")
    g.add_argument(
        "--lr_range_test_staircase", type=bool, default=False, help="use staircase scaling for LR range test."
    )
    g.add_argument("--cycle_first_step_size", type=int, default=1000, help="size of first step of 1Cycle schedule.")
    g.add_argument("--cycle_first_stair_count", type=int, default=-1, help="first stair count for 1Cycle schedule.")
    g.add_argument("--cycle_second_step_size", type=int, default=-1, help="size of second step of 1Cycle schedule.")
    g.add_argument("--cycle_second_stair_count", type=int, default=-1, help="second stair count for 1Cycle schedule.")
    g.add_argument("--decay_step_size", type=int, default=1000, help="size of intervals for post cycle decay.")
    g.add_argument("--cycle_min_lr", type=float, default=0.01, help="1Cycle LR lower bound.")
    g.add_argument("--cycle_max_lr", type=float, default=0.1, help="1Cycle LR upper bound.")
    g.add_argument("--decay_lr_rate", type=float, default=0.0, help="post cycle LR decay rate.")
    g.add_argument("--cycle_momentum", default=False, action="store_true", help="Enable 1Cycle momentum schedule.")
    g.add_argument("--cycle_min_mom", type=float, default=0.8, help="1Cycle momentum lower bound.")
    g.add_argument("--cycle_max_mom", type=float, default=0.9, help="1Cycle momentum upper bound.")
    g.add_argument("--decay_mom_rate", type=float, default=0.0, help="post cycle momentum decay rate.")
    g.add_argument("--warmup_min_lr", type=float, default=0, help="WarmupLR minimum/initial LR value")
    g.add_argument("--warmup_max_lr", type=float, default=0.001, help="WarmupLR maximum LR value.")
    g.add_argument("--warmup_num_steps", type=int, default=1000, help="WarmupLR step count for LR warmup.")
    g.add_argument("--warmup_type", type=str, default=WARMUP_LOG_RATE, help="WarmupLR increasing function")
    g.add_argument("--warmup_min_ratio", type=float, default=0.01, help="Cosine LR lower bound.")
    g.add_argument("--cos_min_ratio", type=float, default=0.01, help="Cosine LR lower bound.")
    return parser


def parse_arguments() -> tuple[argparse.Namespace, list[str]]:
    """Parse only the tuning flags from ``sys.argv`` (the rest is returned unparsed)."""
    return add_tuning_arguments(argparse.ArgumentParser()).parse_known_args()


def _copy(args: Any, params: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            params[key] = value


def override_params(args: Any, params: dict[str, Any]) -> None:
    """Copy every tuning flag set on ``args`` into ``params`` (DeepSpeed's ``override_params``)."""
    _copy(args, params, _RANGE_TEST_KEYS + _ONE_CYCLE_KEYS + _WARMUP_KEYS)


def get_config_from_args(args: Any) -> tuple[dict[str, Any] | None, str | None]:
    """``({"type": ..., "params": {...}}, None)`` from ``--lr_schedule`` and its flags, or ``(None, reason)``."""
    schedule = getattr(args, LR_SCHEDULE, None)
    if schedule is None:
        return None, f"--{LR_SCHEDULE} not specified on command line"
    if schedule not in VALID_LR_SCHEDULES:
        return None, f"{schedule} is not supported LR schedule"
    params: dict[str, Any] = {}
    if schedule == LR_RANGE_TEST:
        _copy(args, params, _RANGE_TEST_KEYS)
    elif schedule == ONE_CYCLE:
        _copy(args, params, _ONE_CYCLE_KEYS)
    else:
        _copy(args, params, _WARMUP_KEYS)
    return {"type": schedule, "params": params}, None


def get_lr_from_config(config: dict[str, Any]) -> tuple[Any, str]:
    """The peak lr a schedule section names (``(None, reason)`` when it cannot tell), as DeepSpeed."""
    if "type" not in config:
        return None, "LR schedule type not defined in config"
    if "params" not in config:
        return None, "LR schedule params not defined in config"
    schedule, params = config["type"], config["params"]
    if schedule not in VALID_LR_SCHEDULES:
        return None, f"{schedule} is not a valid LR schedule"
    if schedule == LR_RANGE_TEST:
        return params[LR_RANGE_TEST_MIN_LR], ""
    if schedule == ONE_CYCLE:
        return params[CYCLE_MAX_LR], ""
    return params[WARMUP_MAX_LR], ""
