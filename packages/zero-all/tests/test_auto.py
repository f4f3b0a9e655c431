"""'auto' values: resolved from initialize()'s arguments, or refused with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zero_all.config import ConfigError, ZeroAllConfig, resolve_batch_sizes
from zero_all.config.auto import AutoContext, resolve_auto

# Copies of ../shared/examples live in examples/deepspeed_configs (so CI has them).
SHARED = Path(__file__).resolve().parents[3] / "examples" / "deepspeed_configs"


def _hf(name: str) -> dict:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return ZeroAllConfig.load(path).raw


class _HFModel(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8, dtype=dtype)
        self.config = type("Cfg", (), {"hidden_size": 64})()


def test_zero2_auto_scheduler_steps_refused_with_the_key() -> None:
    model = _HFModel()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    with pytest.raises(ConfigError, match=r"scheduler\.params\.warmup_num_steps is 'auto'"):
        resolve_auto(_hf("ds_config_zero2_auto.json"), AutoContext(model, opt, 4))


def test_zero2_auto_with_client_scheduler_resolves_everything() -> None:
    model = _HFModel()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    raw = resolve_auto(_hf("ds_config_zero2_auto.json"), AutoContext(model, opt, 4, client_lr_scheduler=True))
    cfg = ZeroAllConfig.from_dict(raw)
    assert cfg.optimizer is not None
    assert cfg.optimizer.params == {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.1}
    assert cfg.scheduler is None  # the client's scheduler wins, as in DeepSpeed
    assert cfg.fp16.enabled is False and cfg.bf16.enabled is False  # fp32 model
    assert cfg.gradient_clipping == 0.0
    b = resolve_batch_sizes(
        cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps, 2
    )
    assert (b.train_batch_size, b.train_micro_batch_size_per_gpu, b.gradient_accumulation_steps) == (8, 4, 1)


def test_zero3_auto_bucket_sizes_from_hidden_size() -> None:
    raw = resolve_auto(_hf("ds_config_zero3_auto.json"), AutoContext(_HFModel(torch.bfloat16), None, 2))
    zero = raw["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640
    assert raw["train_micro_batch_size_per_gpu"] == 2


def test_precision_auto_from_model_dtype() -> None:
    base = {"train_batch_size": 2, "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}
    raw = resolve_auto(base, AutoContext(_HFModel(torch.bfloat16)))
    assert raw["bf16"]["enabled"] is True and raw["fp16"]["enabled"] is False
    raw = resolve_auto(base, AutoContext(_HFModel(torch.float16)))
    assert raw["bf16"]["enabled"] is False and raw["fp16"]["enabled"] is True


def test_seed_config_weight_decay_auto_takes_deepspeed_default() -> None:
    raw = resolve_auto(_hf("ds_config_seed.json"), AutoContext(_HFModel()))
    assert raw["optimizer"]["params"]["weight_decay"] == 0.0
    assert raw["train_micro_batch_size_per_gpu"] is None  # left to the batch arithmetic: 64 / (4 x ranks)


def test_lr_auto_without_client_optimizer_is_refused() -> None:
    raw = {"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    with pytest.raises(ConfigError, match=r"optimizer\.params\.lr is 'auto'.*initialize\(optimizer=\.\.\.\)"):
        resolve_auto(raw, AutoContext(_HFModel()))


def test_unresolvable_auto_elsewhere_names_the_key() -> None:
    raw = {"train_batch_size": 2, "zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}
    with pytest.raises(ConfigError, match=r"zero_optimization\.allgather_bucket_size is 'auto'"):
        resolve_auto(raw, AutoContext(_HFModel()))
