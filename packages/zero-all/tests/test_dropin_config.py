"""Config compatibility with DeepSpeed: hjson files, args.deepscale_config, one config source, new keys, key paths."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import zero_all
from zero_all.api import config_from_args
from zero_all.config import ConfigError, ZeroAllConfig

HJSON = """
// DeepSpeed reads its config with hjson: all of this is accepted there
{
  # hash comments
  train_batch_size: 16
  gradient_accumulation_steps: 2,   /* block comment */
  zero_optimization: {
    stage: 2
    overlap_comm: true
  }
  optimizer: {
    type: AdamW
    params: {
      lr: 3e-4
      betas: [0.9, 0.95,]
    }
  }
  "gradient_clipping": 1.0,
}
"""
SAME_AS_JSON = {
    "train_batch_size": 16,
    "gradient_accumulation_steps": 2,
    "zero_optimization": {"stage": 2, "overlap_comm": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95]}},
    "gradient_clipping": 1.0,
}


def test_hjson_file_reads_like_its_json(tmp_path: Path) -> None:
    path = tmp_path / "ds_config.json"
    path.write_text(HJSON)
    cfg = ZeroAllConfig.load(path)
    assert cfg.raw == SAME_AS_JSON
    assert cfg.model_dump() == ZeroAllConfig.load(SAME_AS_JSON).model_dump()
    with pytest.raises(ConfigError, match="duplicate key 'stage'"):
        ZeroAllConfig.load("{zero_optimization: {stage: 1\n stage: 2}}")


def _args(**kw: object) -> argparse.Namespace:
    parser = zero_all.add_config_arguments(argparse.ArgumentParser())
    return parser.parse_args([f"--{k}={v}" for k, v in kw.items()])


@pytest.mark.filterwarnings("ignore:--deepscale_config is deprecated")
def test_config_sources_as_deepspeed_picks_them(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    assert config_from_args(_args(deepspeed_config=path), None) == str(path)
    args = _args(deepscale_config=path)
    with pytest.warns(DeprecationWarning, match="deepscale_config"):
        assert config_from_args(args, None) == str(path)
    assert args.deepspeed_config == str(path) and args.deepscale_config is None  # moved, as DeepSpeed does
    with pytest.raises(ConfigError, match=r"both args\.deepscale_config and args\.deepspeed_config"):
        config_from_args(_args(deepscale_config=path, deepspeed_config=path), None)
    with pytest.raises(ConfigError, match=r"both as args\.deepspeed_config .* and as config="):
        config_from_args(_args(deepspeed_config=path), {"train_micro_batch_size_per_gpu": 2})
    assert config_from_args(None, None, {"a": 1}) == {"a": 1}  # config_params, DeepSpeed's old name
    with pytest.raises(ConfigError, match="needs config="):
        config_from_args(_args(), None)


def test_initialize_refuses_two_configs(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    with pytest.raises(ConfigError, match="pass only one"):
        zero_all.initialize(
            args=_args(deepspeed_config=path),
            model=nn.Linear(2, 2),
            optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1),
            config={"train_micro_batch_size_per_gpu": 2},
        )


def test_gradient_allreduce_op_key() -> None:
    assert ZeroAllConfig.load({}).gradient_allreduce_op == "mean"
    assert ZeroAllConfig.load({"gradient_allreduce_op": "SUM"}).gradient_allreduce_op == "sum"
    with pytest.raises(ConfigError, match=r"gradient_allreduce_op.*'mean' or 'sum'"):
        ZeroAllConfig.load({"gradient_allreduce_op": "max"})


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"lr": -0.1}, r"ds_config\.optimizer\.params\.lr: must be a finite number >= 0, got -0\.1"),
        ({"lr": "fast"}, r"ds_config\.optimizer\.params\.lr"),
        ({"eps": -1e-8}, r"ds_config\.optimizer\.params\.eps"),
        ({"weight_decay": -0.01}, r"ds_config\.optimizer\.params\.weight_decay"),
        ({"betas": [0.9]}, r"ds_config\.optimizer\.params\.betas: must be two numbers in \[0, 1\)"),
        ({"betas": [0.9, 1.5]}, r"ds_config\.optimizer\.params\.betas"),
    ],
)
def test_bad_optimizer_values_name_the_key(params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ZeroAllConfig.load({"optimizer": {"type": "AdamW", "params": params}})


def test_optimizer_constructor_checks_name_the_section() -> None:
    """A check only torch's constructor makes (SGD's momentum) still comes back with the key path."""
    cfg = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": -1}}}
    with pytest.raises(ConfigError, match=r"ds_config\.optimizer\.params: SGD refused its parameters: .*momentum"):
        zero_all.initialize(model=nn.Linear(2, 2), config=cfg)
