"""The ``"pipeline"`` config section: DeepSpeed's keys and defaults, plus the schedule to run.

DeepSpeed reads ``"pipeline"`` in ``deepspeed/runtime/config.py`` (``get_pipeline_config``) with
the defaults below and accepts any other key silently; here an unknown key is an error naming it
and listing the accepted ones. What each key does with pipe3d:

* ``schedule`` (pipe3d's): ``"1f1b"`` (DeepSpeed's ``TrainSchedule``), ``"gpipe"`` or
  ``"interleaved"``; unset: interleaved when the PipelineModule has ``num_chunks > 1``, else 1F1B.
* ``recv_ahead`` (pipe3d's): how many receives to keep posted ahead of use, default 8.
* ``activation_checkpoint_interval``: when > 0 it replaces the PipelineModule's own value, as in
  DeepSpeed's pipeline engine.
* ``stages``: ``"auto"`` or the PipelineModule's stage count (another number is an error: the
  stage count is the module's ``num_stages`` / topology, as in DeepSpeed, where the key is unused).
* ``partition``, ``seed_layers``: accepted; the PipelineModule's ``partition_method`` and
  ``seed_layers`` arguments decide (DeepSpeed's engine does not read them either).
* ``pipe_partitioned``, ``grad_partitioned``: accepted (booleans, as DeepSpeed asserts); pipe3d
  sends whole activations and gradients between stages, it does not split them over the
  tensor-parallel ranks. Same numbers, more bytes on the wire with tensor parallelism.
* ``use_reentrant``: accepted (boolean); act-ckpt's checkpoint is always non-reentrant, which is
  what lets a first layer on integer token ids be checkpointed.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from pipe3d.executor import DEFAULT_RECV_AHEAD

__all__ = ["SCHEDULE_NAMES", "SECTION", "PipelineConfig"]

SECTION = "pipeline"
"""The key of this section in a ds_config."""

SCHEDULE_NAMES = ("1f1b", "gpipe", "interleaved")
"""What ``pipeline.schedule`` accepts (case-insensitive)."""


class PipelineConfig(BaseModel):
    """The ``"pipeline"`` section (see the module docstring for what each key does)."""

    model_config = ConfigDict(extra="forbid")

    schedule: Literal["1f1b", "gpipe", "interleaved"] | None = None
    """The training schedule; None: interleaved for a module with ``num_chunks > 1``, else 1F1B."""

    recv_ahead: int = Field(DEFAULT_RECV_AHEAD, ge=0)
    """pipe3d's: receives kept posted ahead of the instructions that need them (0: each at its own), see
    docs/pipe3d.md#point-to-point; each costs one stage-boundary tensor of memory."""
    stages: int | Literal["auto"] = "auto"
    """DeepSpeed's key; ``"auto"`` or the PipelineModule's stage count."""

    partition: str = "best"
    """DeepSpeed's key; accepted, the PipelineModule's ``partition_method`` decides."""

    seed_layers: StrictBool = False
    """DeepSpeed's key; accepted, the PipelineModule's ``seed_layers`` decides."""

    activation_checkpoint_interval: int = Field(0, ge=0)
    """When > 0: checkpoint runs of this many layers, replacing the PipelineModule's value."""

    pipe_partitioned: StrictBool = True
    """DeepSpeed's activation partitioning over tensor-parallel ranks; accepted, not done (whole tensors are sent)."""

    grad_partitioned: StrictBool = True
    """DeepSpeed's gradient partitioning over tensor-parallel ranks; accepted, not done (whole tensors are sent)."""

    use_reentrant: StrictBool = True
    """DeepSpeed's reentrant-checkpoint switch; accepted, act-ckpt is always non-reentrant."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            accepted = list(cls.model_fields)
            for key in data:
                if key not in accepted:
                    close = difflib.get_close_matches(str(key), accepted, n=1, cutoff=0.75)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"ds_config.pipeline.{key}: unknown key{hint}; accepted: {', '.join(accepted)}")
        return data

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_name(cls, v: Any) -> Any:
        if v is None:
            return v
        key = str(v).lower().replace("-", "").replace("_", "")
        key = {"onefoneb": "1f1b", "interleaved1f1b": "interleaved"}.get(key, key)
        if key not in SCHEDULE_NAMES:
            raise ValueError(
                f"ds_config.pipeline.schedule: unknown schedule {v!r}; accepted: {', '.join(SCHEDULE_NAMES)}"
            )
        return key

    @field_validator("stages")
    @classmethod
    def _positive_stages(cls, v: Any) -> Any:
        if v != "auto" and v < 1:
            raise ValueError(f"ds_config.pipeline.stages: must be 'auto' or >= 1, got {v}")
        return v

    def schedule_for(self, num_chunks: int) -> str:
        """The schedule to run for a module with ``num_chunks`` chunks per stage."""
        if self.schedule is not None:
            return self.schedule
        return "interleaved" if num_chunks > 1 else "1f1b"
