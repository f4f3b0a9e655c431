"""Config sections: DeepSpeed's keys and defaults, unknown keys and bad values rejected with the key path."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ds_monitor.config import (
    CometConfig,
    CSVConfig,
    CSVMonitorConfig,
    FlopsProfilerConfig,
    TensorBoardConfig,
    WandbConfig,
    get_monitor_config,
)


def test_defaults_match_deepspeed() -> None:
    tb = TensorBoardConfig()
    assert (tb.enabled, tb.output_path, tb.job_name) == (False, "", "DeepSpeedJobName")
    csv = CSVMonitorConfig()
    assert (csv.enabled, csv.output_path, csv.job_name) == (False, "", "DeepSpeedJobName")
    assert CSVConfig is CSVMonitorConfig
    wb = WandbConfig()
    assert (wb.enabled, wb.group, wb.team, wb.project) == (False, None, None, "deepspeed")
    comet = CometConfig()
    assert comet.samples_log_interval == 100
    assert comet.online is None and comet.mode is None and comet.api_key is None
    fp = FlopsProfilerConfig()
    assert (fp.enabled, fp.profile_step, fp.module_depth, fp.top_modules, fp.detailed) == (False, 1, -1, 1, True)


def test_whole_ds_config_reads_only_monitor_sections() -> None:
    cfg = get_monitor_config(
        {
            "train_batch_size": 8,
            "tensorboard": {"enabled": True, "output_path": "logs/", "job_name": "run1"},
            "csv_monitor": {"enabled": True},
        }
    )
    assert cfg.enabled
    assert cfg.tensorboard.output_path == "logs/" and cfg.tensorboard.job_name == "run1"
    assert cfg.csv_monitor.enabled and not cfg.wandb.enabled
    assert not get_monitor_config({}).enabled


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"tensorboard": {"enable": True}}, "tensorboard.enable: Extra inputs are not permitted"),
        ({"wandb": {"enabled": "maybe"}}, "wandb.enabled: Input should be a valid boolean"),
        ({"comet": {"mode": "append"}}, "comet.mode: Input should be 'get', 'create' or 'get_or_create'"),
        ({"comet": {"samples_log_interval": 0}}, "comet.samples_log_interval"),
        ({"comet": {"experiment_key": "short"}}, "comet.experiment_key: Value error, must be 32 to 50 alphanumeric"),
    ],
)
def test_bad_values_name_the_key_path(section: dict, expected: str) -> None:
    with pytest.raises(ValueError, match="invalid monitor config") as info:
        get_monitor_config(section)
    assert expected in str(info.value)


def test_assignment_is_validated() -> None:
    cfg = TensorBoardConfig()
    with pytest.raises(ValidationError):
        cfg.enabled = "sometimes"  # type: ignore[assignment]
