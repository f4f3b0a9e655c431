"""MixedPrecisionOptimizer trains a tiny model in fp16/bf16 like fp32 training does.

Tolerances (relative, per step, on the training loss of a 16-32-4 MLP, AdamW lr 1e-2,
grad clipping 1.0, 40 steps): fp16 with dynamic scaling 1e-2 (measured ~3e-4); bf16 3e-2
(measured ~2.5e-3). The underflow case multiplies the loss by 1e-7, so fp16 gradients of
the output (~1e-9) flush to zero without scaling; AdamW is invariant to that factor, so the
fp32 run and the scaled fp16 run learn as before.
"""

from __future__ import annotations

import functools

import torch

from amp_scaler import DynamicLossScaler, MixedPrecisionOptimizer, StaticLossScaler

STEPS = 40


def build(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    return model.to(dtype)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    y = torch.tanh(x @ torch.randn(16, 4, generator=g))
    return x, y


@functools.cache
def train_fp32(steps: int = STEPS, loss_factor: float = 1.0) -> tuple[float, ...]:
    """The plain-PyTorch reference: fp32 model, AdamW, clip_grad_norm_ (cached: tests share it)."""
    model, (x, y) = build(torch.float32), data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y) * loss_factor
        losses.append(loss.item() / loss_factor)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return tuple(losses)


def train_mixed(
    dtype: torch.dtype, scaler=None, steps: int = STEPS, loss_factor: float = 1.0
) -> tuple[list[float], MixedPrecisionOptimizer]:
    model, (x, y) = build(dtype), data()
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), scaler, clip_grad=1.0)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y) * loss_factor
        losses.append(loss.item() / loss_factor)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
    assert all(p.dtype == dtype for p in model.parameters())
    return losses, opt


def max_rel(a: list[float], b: tuple[float, ...]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def test_fp16_dynamic_tracks_fp32() -> None:
    ref = train_fp32()
    fp16, opt = train_mixed(torch.float16)
    assert isinstance(opt.loss_scaler, DynamicLossScaler)
    assert opt.skipped_steps == 0
    assert ref[-1] < 0.3 * ref[0]  # it did learn
    assert max_rel(fp16, ref) < 1e-2


def test_fp16_overflow_steps_are_skipped_then_tracks_fp32() -> None:
    # 2**30 overflows fp16 gradients: the first steps are skipped (params untouched) and the
    # scale halves until it fits; afterwards the run follows fp32 training step for step.
    scaler = DynamicLossScaler(init_scale=2.0**30, hysteresis=1)
    fp16, opt = train_mixed(torch.float16, scaler)
    skipped = opt.skipped_steps
    assert 0 < skipped < 20
    assert opt.loss_scale < 2.0**30
    assert len(set(fp16[: skipped + 1])) == 1  # nothing changed while skipping
    ref = train_fp32(steps=STEPS - skipped)
    assert max_rel(fp16[skipped:], ref) < 1e-2


def test_fp16_underflow_without_scaling_and_the_fix() -> None:
    ref = train_fp32(loss_factor=1e-7)
    unscaled, _ = train_mixed(torch.float16, StaticLossScaler(1.0), loss_factor=1e-7)
    scaled, _ = train_mixed(torch.float16, DynamicLossScaler(), loss_factor=1e-7)
    assert ref[-1] < 0.4 * ref[0]
    # Without scaling the gradients flush to zero: the loss barely moves.
    assert unscaled[-1] > 0.95 * unscaled[0]
    # With scaling fp16 learns as fp32 does.
    assert max_rel(scaled, ref) < 1e-2


def test_bf16_with_fp32_master_tracks_fp32() -> None:
    ref = train_fp32()
    bf16, opt = train_mixed(torch.bfloat16)
    assert isinstance(opt.loss_scaler, StaticLossScaler) and opt.loss_scale == 1.0
    assert max_rel(bf16, ref) < 3e-2


def test_bf16_master_weights_keep_small_updates() -> None:
    # A 1e-4 update on a weight of 1.0 is below bf16's resolution (2**-7): without fp32
    # masters it is lost every step; with them it accumulates.
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MixedPrecisionOptimizer(torch.optim.SGD([p], lr=1e-4))
    for _ in range(100):
        p.grad = torch.ones(4, dtype=torch.bfloat16)
        opt.step()
    assert opt.master_params[0].dtype == torch.float32
    torch.testing.assert_close(opt.master_params[0], torch.full((4,), 0.99), rtol=0, atol=1e-5)
    assert p.dtype == torch.bfloat16 and p[0].item() < 1.0
