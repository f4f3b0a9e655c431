"""MixedPrecisionOptimizer: checkpoints round-trip (pickle-free), construction rules, from_config."""

from __future__ import annotations

import json

import pytest
import torch

from amp_scaler import (
    DynamicLossScaler,
    MixedPrecisionOptimizer,
    merge_tensors,
    parse_bf16,
    parse_fp16,
    split_tensors,
)


def build() -> tuple[torch.nn.Module, MixedPrecisionOptimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).half()
    # A small window so the scale moves during the test; hysteresis 1 so an overflow halves it.
    scaler = DynamicLossScaler(init_scale=2.0**20, scale_window=3, hysteresis=1)
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), scaler, clip_grad=1.0)
    return model, opt


def steps(model: torch.nn.Module, opt: MixedPrecisionOptimizer, start: int, n: int) -> list[float]:
    losses = []
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
        loss = torch.nn.functional.mse_loss(model(x.half()).float(), y)
        losses.append(loss.item())
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
    return losses


def save(opt: MixedPrecisionOptimizer) -> tuple[dict[str, torch.Tensor], str]:
    tensors, meta = opt.split_state_dict()
    return {k: v.clone() for k, v in tensors.items()}, json.dumps(meta)  # JSON proves no pickle is needed


def test_resume_is_bit_exact() -> None:
    model, opt = build()
    steps(model, opt, 0, 5)
    assert opt.skipped_steps > 0  # 2**20 overflowed fp16 at first: the scaler state matters
    tensors, meta = save(opt)
    expected = steps(model, opt, 5, 6)
    expected_params = [p.detach().clone() for p in model.parameters()]

    model2, opt2 = build()
    opt2.load_split_state_dict(tensors, json.loads(meta))
    assert opt2.loss_scaler.state_dict() == json.loads(meta)["loss_scaler"]
    # The model's fp16 params were restored from the fp32 masters.
    for p, m in zip(model2.parameters(), opt2.master_params, strict=True):
        assert torch.equal(p, m.half())
    got = steps(model2, opt2, 5, 6)
    assert got == expected
    for a, b in zip(model2.parameters(), expected_params, strict=True):
        assert torch.equal(a, b)
    assert opt2.loss_scaler.state_dict() == opt.loss_scaler.state_dict()


def test_state_dict_shape_mismatch() -> None:
    _, opt = build()
    state = opt.state_dict()
    state["master_weights"] = state["master_weights"][:-1]
    with pytest.raises(ValueError, match="saved master weights"):
        opt.load_state_dict(state)
    state = opt.state_dict()
    state["master_weights"][0] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(state)


def test_split_merge_round_trip() -> None:
    state = {
        "a": torch.arange(3),
        "nested": {0: {"t": torch.ones(2), "step": 3}, 1: {"t": torch.zeros(1)}},
        "betas": (0.9, 0.999),
        "inf": float("inf"),
        "dtype": torch.bfloat16,
        "none": None,
    }
    tensors, meta = split_tensors(state)
    back = merge_tensors(tensors, json.loads(json.dumps(meta)))
    assert set(back["nested"]) == {0, 1}
    assert torch.equal(back["nested"][0]["t"], torch.ones(2)) and back["nested"][0]["step"] == 3
    assert back["betas"] == [0.9, 0.999] and back["inf"] == float("inf") and back["dtype"] is torch.bfloat16
    with pytest.raises(TypeError, match="'x/obj'"):
        split_tensors({"x": {"obj": object()}})
    with pytest.raises(KeyError, match="missing"):
        merge_tensors({}, meta)


def test_fp32_params_are_stepped_in_place() -> None:
    w16 = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    w32 = torch.nn.Parameter(torch.ones(3))
    opt = MixedPrecisionOptimizer(torch.optim.SGD([w16, w32], lr=0.5))
    assert opt.master_params[1] is w32 and opt.master_params[0] is not w16
    assert isinstance(opt.loss_scaler, DynamicLossScaler)  # fp16 present: dynamic by default
    opt.loss_scaler.cur_scale = 1024.0  # 2**16 * 1 would be inf in fp16
    w16.grad = torch.ones(3, dtype=torch.float16) * opt.loss_scale
    w32.grad = torch.ones(3) * opt.loss_scale
    assert opt.step()
    assert torch.equal(w16, torch.full((3,), 0.5, dtype=torch.float16))
    assert torch.equal(w32.detach(), torch.full((3,), 0.5))
    assert opt.global_grad_norm == pytest.approx(6**0.5)


def test_overflow_skips_and_leaves_params() -> None:
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = MixedPrecisionOptimizer(torch.optim.SGD([w], lr=0.5), DynamicLossScaler(init_scale=8, hysteresis=1))
    w.grad = torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float16)
    assert not opt.step()
    assert opt.overflow and opt.skipped_steps == 1 and opt.loss_scale == 4
    assert torch.equal(w, torch.ones(3, dtype=torch.float16)) and w.grad is None


def test_construction_errors() -> None:
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    inner = torch.optim.Adam([w])
    w.grad = torch.ones(2, dtype=torch.float16)
    inner.step()
    with pytest.raises(ValueError, match="fresh optimizer"):
        MixedPrecisionOptimizer(inner)
    with pytest.raises(ValueError, match="clip_grad"):
        MixedPrecisionOptimizer(torch.optim.SGD([w], lr=1.0), clip_grad=-1)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        MixedPrecisionOptimizer([w])


def test_from_config() -> None:
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    opt = MixedPrecisionOptimizer.from_config(
        torch.optim.SGD([w], lr=1.0),
        fp16=parse_fp16({"enabled": True, "initial_scale_power": 8, "loss_scale_window": 5}),
        gradient_clipping=2.0,
    )
    assert opt.loss_scale == 256 and opt.loss_scaler.scale_window == 5 and opt.clip_grad == 2.0
    with pytest.raises(ValueError, match="both true"):
        MixedPrecisionOptimizer.from_config(
            torch.optim.SGD([w], lr=1.0), parse_fp16({"enabled": True}), parse_bf16({"enabled": True})
        )


def test_immediate_grad_update_accumulates_in_fp32() -> None:
    # Four micro-batches of bf16 grads: accumulated in bf16 they lose bits; with
    # immediate_grad_update the fp32 master grad is the exact fp32 sum of the bf16 micro-grads.
    def micro_grads() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        return [torch.randn(64, generator=g).to(torch.bfloat16) * (1 + 300 * i) for i in range(4)]

    exact = torch.stack([m.float() for m in micro_grads()]).sum(0)
    results = {}
    for immediate in (False, True):
        w = torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))
        opt = MixedPrecisionOptimizer(torch.optim.SGD([w], lr=1.0), immediate_grad_update=immediate, clip_grad=0.0)
        for mg in micro_grads():
            (w * mg).sum().backward()  # d/dw = mg, accumulated by autograd
        if immediate:
            assert w.grad is None  # moved into the fp32 master at once
        assert opt.step()
        results[immediate] = -opt.master_params[0].detach()
        opt.remove_hooks()
    assert torch.equal(results[True], exact)
    assert not torch.equal(results[False], exact)


def test_from_config_immediate_and_refusals() -> None:
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    opt = MixedPrecisionOptimizer.from_config(
        torch.optim.SGD([w], lr=1.0), bf16=parse_bf16({"enabled": True, "immediate_grad_update": True})
    )
    assert opt.immediate_grad_update and opt.loss_scale == 1.0
    with pytest.raises(ValueError, match="fp16_master_weights_and_grads"):
        MixedPrecisionOptimizer.from_config(
            torch.optim.SGD([w], lr=1.0), parse_fp16({"enabled": True, "fp16_master_weights_and_grads": True})
        )


def test_cast_floating() -> None:
    from collections import namedtuple

    from amp_scaler import cast_floating

    Pair = namedtuple("Pair", "x ids")
    out = cast_floating(
        {
            "a": [torch.ones(2), (torch.arange(3),)],
            "p": Pair(torch.zeros(1), torch.ones(1, dtype=torch.long)),
            "s": "text",
        },
        torch.float16,
    )
    assert out["a"][0].dtype == torch.float16 and out["a"][1][0].dtype == torch.long
    assert isinstance(out["p"], Pair) and out["p"].x.dtype == torch.float16 and out["p"].ids.dtype == torch.long
    assert out["s"] == "text"
