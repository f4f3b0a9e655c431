"""The batch triple: train_batch_size = micro_batch x gradient_accumulation_steps x data-parallel size.

Any two of the three determine the third (with the world size); one alone is enough when
gradient accumulation can default to 1, as in DeepSpeed. Inconsistent values are an error
that shows the arithmetic, so the user sees which number to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from zero_all.config.loader import ConfigError

__all__ = ["BatchSizes", "resolve_batch_sizes"]


@dataclass(frozen=True)
class BatchSizes:
    """The resolved triple (all positive ints)."""

    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigError(f"ds_config.{name} must be a positive integer, got {value!r}")


def resolve_batch_sizes(
    train_batch_size: int | None,
    micro_batch: int | None,
    grad_accum: int | None,
    world_size: int,
) -> BatchSizes:
    """Fill in the missing members of the triple, or raise ConfigError showing the arithmetic."""
    _check_positive("train_batch_size", train_batch_size)
    _check_positive("train_micro_batch_size_per_gpu", micro_batch)
    _check_positive("gradient_accumulation_steps", grad_accum)
    ws = world_size
    tbs, mb, gas = train_batch_size, micro_batch, grad_accum
    if tbs is not None and mb is not None and gas is not None:
        if mb * gas * ws != tbs:
            raise ConfigError(
                "ds_config batch sizes are inconsistent: train_batch_size must equal "
                "train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size, but "
                f"{mb} x {gas} x {ws} = {mb * gas * ws} != {tbs}"
            )
    elif tbs is not None and mb is not None:
        if tbs % (mb * ws):
            raise ConfigError(
                "ds_config: train_batch_size is not a multiple of train_micro_batch_size_per_gpu x world size: "
                f"{tbs} / ({mb} x {ws}) = {tbs / (mb * ws):g} gradient accumulation steps"
            )
        gas = tbs // (mb * ws)
    elif tbs is not None and gas is not None:
        if tbs % (gas * ws):
            raise ConfigError(
                "ds_config: train_batch_size is not a multiple of gradient_accumulation_steps x world size: "
                f"{tbs} / ({gas} x {ws}) = {tbs / (gas * ws):g} micro batch per rank"
            )
        mb = tbs // (gas * ws)
    elif mb is not None and gas is not None:
        tbs = mb * gas * ws
    elif tbs is not None:
        gas = 1
        if tbs % ws:
            raise ConfigError(
                f"ds_config: train_batch_size {tbs} is not divisible by the world size {ws} "
                f"({tbs} / {ws} = {tbs / ws:g} per rank); set train_micro_batch_size_per_gpu and "
                "gradient_accumulation_steps explicitly"
            )
        mb = tbs // ws
    elif mb is not None:
        gas = 1
        tbs = mb * ws
    else:
        raise ConfigError(
            "ds_config: set train_batch_size or train_micro_batch_size_per_gpu (any two of train_batch_size, "
            "train_micro_batch_size_per_gpu and gradient_accumulation_steps determine the third)"
        )
    assert tbs is not None and mb is not None and gas is not None
    return BatchSizes(tbs, mb, gas)
