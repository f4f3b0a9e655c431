"""The fp16/bf16 sections: DeepSpeed's keys and defaults, clear errors naming the key."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from amp_scaler import BF16Config, FP16Config, PrecisionConfig, check_precision, parse_bf16, parse_fp16


def test_defaults_match_deepspeed() -> None:
    c = FP16Config()
    assert c.enabled is False and c.auto_cast is False
    assert c.loss_scale == 0 and c.dynamic_loss_scale
    assert (c.initial_scale_power, c.loss_scale_window, c.hysteresis) == (16, 1000, 2)
    assert c.consecutive_hysteresis is False and c.min_loss_scale == 1
    assert c.fp16_master_weights_and_grads is False
    assert c.initial_dynamic_scale == 65536.0
    b = BF16Config()
    assert b.enabled is False and b.immediate_grad_update is False and b.check_grad_overflow is False


def test_every_deepspeed_key_is_accepted() -> None:
    fp16 = {
        "enabled": True,
        "auto_cast": True,
        "loss_scale": 0,
        "initial_scale_power": 15,
        "loss_scale_window": 500,
        "hysteresis": 3,
        "consecutive_hysteresis": True,
        "min_loss_scale": 1,
        "fp16_master_weights_and_grads": False,
    }
    c = parse_fp16(fp16)
    assert c.model_dump() == {**fp16, "loss_scale": 0.0, "min_loss_scale": 1.0}
    b = parse_bf16(
        {
            "enabled": True,
            "immediate_grad_update": True,
            "check_grad_overflow": True,
            "bf16_master_weights_and_grads": True,
            "bf16_optimizer_states": True,
        }
    )
    assert b.immediate_grad_update and b.bf16_optimizer_states


def test_auto_enabled() -> None:
    assert parse_fp16({"enabled": "auto"}).enabled == "auto"
    assert parse_bf16({"enabled": "auto"}).enabled == "auto"
    with pytest.raises(ValueError, match=r"fp16\.enabled"):
        parse_fp16({"enabled": "yes please"})
    with pytest.raises(ValueError, match=r"bf16\.enabled"):
        parse_bf16({"enabled": 2})
    # What DeepSpeed's pydantic bool accepts is accepted here too.
    assert parse_fp16({"enabled": "true"}).enabled is True and parse_bf16({"enabled": 0}).enabled is False


@pytest.mark.parametrize(
    ("section", "bad", "key"),
    [
        ("fp16", {"loss_scale_window": -1}, "fp16.loss_scale_window"),
        ("fp16", {"loss_scale_window": 0}, "fp16.loss_scale_window"),
        ("fp16", {"initial_scale_power": 65}, "fp16.initial_scale_power"),
        ("fp16", {"hysteresis": 0}, "fp16.hysteresis"),
        ("fp16", {"min_loss_scale": 0}, "fp16.min_loss_scale"),
        ("fp16", {"loss_scale": -2}, "fp16.loss_scale"),
        ("fp16", {"loss_scale": True}, "fp16.loss_scale"),
        ("fp16", {"loss_scale": float("inf")}, "fp16.loss_scale"),
        ("fp16", {"loss_scale_windows": 10}, "fp16.loss_scale_windows"),
        ("bf16", {"immediate_grad_updates": True}, "bf16.immediate_grad_updates"),
        ("bf16", {"bf16_optimizer_states": True}, "bf16.bf16_optimizer_states"),
    ],
)
def test_bad_values_name_the_key(section: str, bad: dict, key: str) -> None:
    parse = parse_fp16 if section == "fp16" else parse_bf16
    with pytest.raises(ValueError) as err:
        parse(bad)
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_unknown_key_lists_accepted_keys() -> None:
    with pytest.raises(ValueError, match="unknown key; accepted keys: enabled, auto_cast"):
        parse_fp16({"enable": True})
    # The models themselves refuse too (for callers that compose them into a bigger model).
    with pytest.raises(ValidationError, match="enable"):
        FP16Config.model_validate({"enable": True})


def test_both_enabled_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"fp16\.enabled and bf16\.enabled are both true"):
        check_precision(FP16Config(enabled=True), BF16Config(enabled=True))
    with pytest.raises(ValidationError, match=r"fp16\.enabled and bf16\.enabled are both true"):
        PrecisionConfig.model_validate({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    # "auto" is resolved later, so it is not a conflict yet.
    check_precision(FP16Config(enabled=True), BF16Config(enabled="auto"))
    check_precision(FP16Config(enabled=False), BF16Config(enabled=True))


def test_hugging_face_style_sections_parse() -> None:
    # The sections as Hugging Face's Trainer configs and DeepSpeed's examples write them.
    cfg = PrecisionConfig.model_validate(
        {
            "fp16": {
                "enabled": "auto",
                "loss_scale": 0,
                "loss_scale_window": 1000,
                "initial_scale_power": 16,
                "hysteresis": 2,
                "min_loss_scale": 1,
            },
            "bf16": {"enabled": "auto"},
        }
    )
    assert cfg.fp16.enabled == "auto" and cfg.bf16.enabled == "auto"
