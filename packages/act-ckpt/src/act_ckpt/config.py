"""The ``"activation_checkpointing"`` config section, with DeepSpeed's key names and defaults.

The engine composes this into the full ds_config model (section ``"activation_checkpointing"`` ->
:class:`ActivationCheckpointingConfig`). Every key DeepSpeed accepts is accepted here; an unknown
key or a wrong type is an error that names the key path
(``activation_checkpointing.cpu_checkpointing``) and what is accepted.

What each key does in act-ckpt (see ``docs/act-ckpt.md`` for the longer story):

* ``partition_activations``: the saved inputs of every checkpointed region are split across the
  model-parallel group given to :func:`act_ckpt.configure` and all-gathered for the recompute.
* ``cpu_checkpointing``: the saved inputs go to host memory (pinned when CUDA is present).
* ``synchronize_checkpoint_boundary``: device synchronize at the start and end of every
  checkpointed forward and recompute (a no-op on CPU, where work is synchronous already).
* ``profile``: time every checkpointed forward and recompute, logged on the ``act_ckpt`` logger
  and summed in :func:`act_ckpt.profile_summary`.
* ``contiguous_memory_optimization`` and ``number_checkpoints``: accepted and checked as
  DeepSpeed checks them, but no-ops: they size DeepSpeed's preallocated CUDA buffers against
  allocator fragmentation, which PyTorch's caching allocator (``expandable_segments``) handles.

DeepSpeed checks the consistency of these keys only when checkpointing is configured (its
``deepspeed.checkpointing.configure``), not when the config is read; so do we:
:meth:`ActivationCheckpointingConfig.check_consistent` is called by :func:`act_ckpt.configure`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

__all__ = [
    "SECTION",
    "ActivationCheckpointingConfig",
    "format_validation_error",
    "parse_activation_checkpointing",
    "section_of",
]

SECTION = "activation_checkpointing"
"""The key of this section in a ds_config."""


class ActivationCheckpointingConfig(BaseModel):
    """The ``"activation_checkpointing"`` section (DeepSpeed's keys and defaults: everything off)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    partition_activations: StrictBool = False
    """Split the saved inputs of each checkpointed region across the model-parallel group."""

    contiguous_memory_optimization: StrictBool = False
    """DeepSpeed: copy partitioned checkpoints into preallocated contiguous buffers. Accepted;
    needs ``partition_activations`` and ``number_checkpoints`` as in DeepSpeed; a no-op here."""

    cpu_checkpointing: StrictBool = False
    """Keep the saved inputs of each checkpointed region in host memory until the backward."""

    number_checkpoints: int | None = Field(None, gt=0)
    """DeepSpeed: how many checkpoints a forward stores (sizes the contiguous buffers). A positive
    integer or null; ``false`` is read as null (configs in the wild write it)."""

    synchronize_checkpoint_boundary: StrictBool = False
    """Synchronize the device at the start and end of every checkpointed forward and recompute."""

    profile: StrictBool = False
    """Time every checkpointed forward and recompute and log the times."""

    @field_validator("number_checkpoints", mode="before")
    @classmethod
    def _number_checkpoints(cls, v: Any) -> Any:
        if v is False or v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{SECTION}.number_checkpoints must be a positive integer or null, got {v!r}")
        return v

    def check_consistent(self) -> None:
        """Raise ValueError for the combinations DeepSpeed refuses when checkpointing is configured."""
        if self.contiguous_memory_optimization and not self.partition_activations:
            raise ValueError(
                f"{SECTION}.contiguous_memory_optimization=true needs {SECTION}.partition_activations=true "
                "(as in DeepSpeed: contiguous buffers hold partitioned activations)"
            )
        if self.contiguous_memory_optimization and self.number_checkpoints is None:
            raise ValueError(
                f"{SECTION}.contiguous_memory_optimization=true needs {SECTION}.number_checkpoints "
                "(a positive integer: how many checkpoints one forward stores)"
            )


def format_validation_error(err: ValidationError, section: str = SECTION) -> str:
    """One line per problem: ``activation_checkpointing.key: message (got value)``."""
    lines = []
    for e in err.errors():
        path = ".".join([section, *(str(p) for p in e["loc"])])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            accepted = ", ".join(ActivationCheckpointingConfig.model_fields)
            msg = f"unknown key; accepted keys: {accepted}"
        lines.append(f"{path}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_activation_checkpointing(value: Any) -> ActivationCheckpointingConfig:
    """Read the section from a dict (or pass a model through); errors name the key path.

    Accepts the section (``{"partition_activations": true}``), an :class:`ActivationCheckpointingConfig`
    (returned as is) or None (all defaults). Raises ValueError with one line per problem. A whole
    ds_config goes through :func:`section_of` first.
    """
    if value is None:
        return ActivationCheckpointingConfig()
    if isinstance(value, ActivationCheckpointingConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(
            f"{SECTION} must be a dict (a JSON object), an ActivationCheckpointingConfig or None, "
            f"got {type(value).__name__}"
        )
    try:
        return ActivationCheckpointingConfig.model_validate(value)
    except ValidationError as err:
        raise ValueError(format_validation_error(err)) from None


def section_of(ds_config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``"activation_checkpointing"`` section of a whole ds_config dict (None when absent)."""
    if not isinstance(ds_config, dict):
        raise ValueError(f"a ds_config must be a dict, got {type(ds_config).__name__}")
    return ds_config.get(SECTION)
