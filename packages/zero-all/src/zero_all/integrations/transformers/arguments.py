"""``TrainingArguments`` whose ``--deepspeed`` config goes to zero-all instead of DeepSpeed.

transformers' own ``TrainingArguments.__post_init__`` turns ``deepspeed=`` into an accelerate
DeepSpeed plugin (which imports ``deepspeed``). These subclasses move the value to
``zero_all_config`` first, so a script, its ``HfArgumentParser`` and its ``--deepspeed
ds_config.json`` command line stay as they are; the Trainer then hands the config to zero-all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import Seq2SeqTrainingArguments, TrainingArguments

__all__ = ["ZeroAllSeq2SeqTrainingArguments", "ZeroAllTrainingArguments"]

_HELP = (
    "A ds_config (path or dict) for zero-all's engine. `--deepspeed PATH` sets it too (for scripts written for "
    "DeepSpeed); DeepSpeed itself is not used."
)


def _take_deepspeed(args: Any) -> None:
    if args.deepspeed is None:
        return
    if args.zero_all_config is not None:
        raise ValueError(
            f"both deepspeed={args.deepspeed!r} and zero_all_config={args.zero_all_config!r} were given; "
            "they are the same setting, give one"
        )
    args.zero_all_config, args.deepspeed = args.deepspeed, None


@dataclass
class ZeroAllTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` with ``deepspeed`` / ``zero_all_config`` meaning a zero-all ds_config."""

    zero_all_config: dict | str | None = field(default=None, metadata={"help": _HELP})

    def __post_init__(self) -> None:
        _take_deepspeed(self)
        super().__post_init__()


@dataclass
class ZeroAllSeq2SeqTrainingArguments(Seq2SeqTrainingArguments):
    """``transformers.Seq2SeqTrainingArguments`` with ``deepspeed`` / ``zero_all_config`` meaning a zero-all ds_config."""

    zero_all_config: dict | str | None = field(default=None, metadata={"help": _HELP})

    def __post_init__(self) -> None:
        _take_deepspeed(self)
        super().__post_init__()
