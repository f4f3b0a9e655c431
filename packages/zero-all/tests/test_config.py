"""The ds_config loader and model: every error path names the key and what is accepted."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from zero_all.config import ConfigError, ZeroAllConfig, resolve_batch_sizes
from zero_all.config.loader import strip_json_comments

# Copies of ../shared/examples live in examples/deepspeed_configs (so CI has them).
SHARED = Path(__file__).resolve().parents[3] / "examples" / "deepspeed_configs"
EXAMPLES = [SHARED / n for n in ("ds_config_seed.json", "ds_config_zero2_auto.json", "ds_config_zero3_auto.json")]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load_as_they_are(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} not in this checkout")
    cfg = ZeroAllConfig.load(path)
    assert cfg.zero_optimization.stage in (2, 3)


def test_seed_config_values(tmp_path: Path) -> None:
    path = SHARED / "ds_config_seed.json"
    if not path.exists():
        pytest.skip("shared examples not present")
    cfg = ZeroAllConfig.load(str(path))
    assert cfg.train_batch_size == 64 and cfg.gradient_accumulation_steps == 4
    assert cfg.train_micro_batch_size_per_gpu == "auto"
    assert cfg.optimizer is not None and cfg.optimizer.type == "Adam" and cfg.optimizer.params["lr"] == 0.001
    assert cfg.scheduler is not None and cfg.scheduler.params["warmup_num_steps"] == 1000
    assert cfg.fp16.enabled is True and cfg.gradient_clipping == 1.0


def test_comments_stripped_outside_strings_only() -> None:
    text = '{"a": "http://x//y", // comment\n "b": /* block\n */ 2}'
    assert json.loads(strip_json_comments(text)) == {"a": "http://x//y", "b": 2}
    cfg = ZeroAllConfig.load('{"train_batch_size": 8 // the global batch\n}')
    assert cfg.train_batch_size == 8


def test_path_dict_and_string_sources(tmp_path: Path) -> None:
    p = tmp_path / "ds.json"
    p.write_text('{"train_batch_size": 4}')
    for source in (p, str(p), {"train_batch_size": 4}, '{"train_batch_size": 4}'):
        assert ZeroAllConfig.load(source).train_batch_size == 4


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ('{"train_batch_size": 4, "train_batch_size": 8}', "duplicate key 'train_batch_size'"),
        ('{"zero_optimization": {"stage": 1, "stage": 2}}', "duplicate key 'stage'"),
        ('{"train_batch_size": }', "not valid JSON at line 1"),
        ("[1, 2]", "top level must be a JSON object"),
        ("/no/such/ds_config.json", "no such file"),
        ('{"a": 1 /* open', "unterminated"),
    ],
)
def test_loader_errors(source: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ZeroAllConfig.load(source)


def test_non_json_dict_values_rejected() -> None:
    with pytest.raises(ConfigError, match="only JSON values"):
        ZeroAllConfig.load({"train_batch_size": object()})


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (
            {"gradient_acumulation_steps": 2},
            "unknown key 'gradient_acumulation_steps' \\(did you mean 'gradient_accumulation_steps'",
        ),
        ({"zero_optimisation": {}}, "did you mean 'zero_optimization'"),
        ({"totally_new_key": 1}, "unknown key 'totally_new_key'; see docs/config.md"),
        ({"zero_optimization": {"stage": 2, "reduce_bucket_sise": 1}}, "zero_optimization.reduce_bucket_sise"),
        ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage"),
        ({"optimizer": {"type": "Adamw2"}}, "optimizer.type: unknown optimizer 'Adamw2' \\(did you mean"),
        (
            {"optimizer": {"type": "Adam", "params": {"beta": [0.9, 0.99]}}},
            "optimizer.params.beta.*did you mean 'betas'",
        ),
        (
            {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "betas": [0.9, 0.9]}}},
            "optimizer.params.betas: not a parameter of SGD",
        ),
        ({"optimizer": {"params": {}}}, "optimizer.type"),
        (
            {"scheduler": {"type": "WarmupLRx"}},
            "scheduler.type: unknown scheduler 'WarmupLRx' \\(did you mean 'WarmupLR'",
        ),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, "WarmupDecayLR needs total_num_steps"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_steps": 3}}}, "scheduler.params.warmup_steps"),
        ({"fp16": {"loss_scale_window": "abc"}}, "fp16.loss_scale_window"),
        ({"gradient_clipping": -1}, "gradient_clipping"),
        ({"train_batch_size": "big"}, "train_batch_size"),
        ({"bfloat16": {"enabled": True}, "bf16": {"enabled": True}}, "both 'bfloat16' and 'bf16'"),
        ({"pipeline": {"schedul": "gpipe"}}, "ds_config.pipeline.schedul: unknown key \\(did you mean 'schedule'"),
        ({"pipeline": {"schedule": "zigzag"}}, "ds_config.pipeline.schedule: unknown schedule 'zigzag'"),
    ],
)
def test_config_errors_name_the_key(cfg: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ZeroAllConfig.load(cfg)


def test_known_but_unimplemented_keys_warn_once_and_load() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = ZeroAllConfig.load(
            {
                "train_batch_size": 4,
                "autotuning": {"enabled": True},
                "flops_profiler": {},
                "comms_logger": {},
                "compile": {},
                "elasticity": {},
            }
        )
    messages = [str(w.message) for w in caught if "does not implement" in str(w.message)]
    assert len(messages) == 1
    assert "autotuning, comms_logger, compile, elasticity, flops_profiler" in messages[0]
    assert cfg.ignored_keys == ["autotuning", "comms_logger", "compile", "elasticity", "flops_profiler"]


def test_pipeline_section_is_read_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ZeroAllConfig.load({"train_batch_size": 4, "pipeline": {"stages": "auto", "schedule": "GPipe"}})
    assert cfg.pipeline.schedule == "gpipe" and cfg.ignored_keys == []


def test_data_types_section() -> None:
    assert ZeroAllConfig.load({}).data_types.grad_accum_dtype is None
    assert (
        ZeroAllConfig.load({"data_types": {"grad_accum_dtype": "torch.float32"}}).data_types.grad_accum_dtype == "fp32"
    )
    assert ZeroAllConfig.load({"data_types": {"grad_accum_dtype": "bfloat16"}}).data_types.grad_accum_dtype == "bf16"
    with pytest.raises(ConfigError, match=r"data_types\.grad_accum_dtype"):
        ZeroAllConfig.load({"data_types": {"grad_accum_dtype": "int8"}})
    with pytest.raises(ConfigError, match=r"data_types\.grad_acum_dtype"):
        ZeroAllConfig.load({"data_types": {"grad_acum_dtype": "fp32"}})


def test_bfloat16_old_name_is_accepted() -> None:
    assert ZeroAllConfig.load({"bfloat16": {"enabled": True}}).bf16.enabled is True


@pytest.mark.parametrize(
    ("tbs", "mb", "gas", "ws", "want"),
    [
        (32, 4, 4, 2, (32, 4, 4)),
        (32, 4, None, 2, (32, 4, 4)),
        (32, None, 4, 2, (32, 4, 4)),
        (None, 4, 4, 2, (32, 4, 4)),
        (32, None, None, 2, (32, 16, 1)),
        (None, 4, None, 2, (8, 4, 1)),
    ],
)
def test_batch_arithmetic(tbs, mb, gas, ws, want) -> None:
    b = resolve_batch_sizes(tbs, mb, gas, ws)
    assert (b.train_batch_size, b.train_micro_batch_size_per_gpu, b.gradient_accumulation_steps) == want


@pytest.mark.parametrize(
    ("tbs", "mb", "gas", "ws", "match"),
    [
        (30, 4, 4, 2, "4 x 4 x 2 = 32 != 30"),
        (30, 4, None, 2, "30 / \\(4 x 2\\) = 3.75"),
        (30, None, 4, 2, "30 / \\(4 x 2\\) = 3.75"),
        (33, None, None, 2, "not divisible by the world size 2"),
        (None, None, 2, 2, "set train_batch_size or train_micro_batch_size_per_gpu"),
        (None, 0, 1, 2, "train_micro_batch_size_per_gpu must be a positive integer"),
    ],
)
def test_batch_arithmetic_errors_show_the_numbers(tbs, mb, gas, ws, match) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_batch_sizes(tbs, mb, gas, ws)
