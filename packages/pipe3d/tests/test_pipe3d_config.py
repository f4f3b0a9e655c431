"""The ``pipeline`` config section: DeepSpeed's keys and defaults, the schedule, clear errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipe3d.config import PipelineConfig


def test_deepspeed_defaults_and_keys() -> None:
    cfg = PipelineConfig()
    # DeepSpeed's get_pipeline_config defaults.
    assert (cfg.stages, cfg.partition, cfg.seed_layers, cfg.activation_checkpoint_interval) == (
        "auto",
        "best",
        False,
        0,
    )
    assert cfg.pipe_partitioned is True and cfg.grad_partitioned is True and cfg.use_reentrant is True
    assert cfg.schedule is None and cfg.schedule_for(1) == "1f1b" and cfg.schedule_for(2) == "interleaved"
    full = PipelineConfig.model_validate(
        {"stages": 2, "partition": "parameters", "seed_layers": True, "activation_checkpoint_interval": 1}
    )
    assert full.stages == 2 and full.activation_checkpoint_interval == 1
    assert cfg.recv_ahead == 8 and PipelineConfig.model_validate({"recv_ahead": 0}).recv_ahead == 0  # pipe3d's key


@pytest.mark.parametrize(
    ("written", "name"),
    [("1F1B", "1f1b"), ("GPipe", "gpipe"), ("interleaved", "interleaved"), ("interleaved_1f1b", "interleaved")],
)
def test_schedule_names(written: str, name: str) -> None:
    cfg = PipelineConfig.model_validate({"schedule": written})
    assert cfg.schedule == name and cfg.schedule_for(1) == name


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"schedul": "gpipe"}, r"pipeline\.schedul: unknown key \(did you mean 'schedule'\?\); accepted: schedule"),
        ({"micro_batches": 4}, r"pipeline\.micro_batches: unknown key; accepted"),
        ({"schedule": "zigzag"}, r"pipeline\.schedule: unknown schedule 'zigzag'; accepted: 1f1b, gpipe, interleaved"),
        ({"stages": 0}, r"pipeline\.stages: must be 'auto' or >= 1"),
        ({"activation_checkpoint_interval": -1}, "greater than or equal to 0"),
        ({"pipe_partitioned": "yes"}, "valid boolean"),
        ({"recv_ahead": -1}, "greater than or equal to 0"),
    ],
)
def test_bad_keys_are_errors(section: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PipelineConfig.model_validate(section)
