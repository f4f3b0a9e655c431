"""The same checks on a CUDA device (skipped without one)."""

from __future__ import annotations

import math

import pytest
import torch

from amp_scaler import DynamicLossScaler, MixedPrecisionOptimizer, unscale_and_clip_
from zero_testkit import cuda_marks

pytestmark = cuda_marks()

SCALE = 2.0**14


def grads(device: str) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (1000, 7, 4096, 1):
        p = torch.nn.Parameter(torch.zeros(n, device=device))
        p.grad = (torch.randn(n, generator=g) * SCALE).to(device)
        out.append(p)
    return out


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_cuda_matches_torch(max_norm: float) -> None:
    ours, ref = grads("cuda"), grads("cuda")
    opt = torch.optim.SGD(ref, lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=SCALE)
    scaler.scale(torch.ones((), device="cuda"))
    scaler.unscale_(opt)
    expected = float(torch.nn.utils.clip_grad_norm_(ref, max_norm if max_norm > 0 else math.inf))
    norm, found_inf = unscale_and_clip_([p.grad for p in ours], 1 / SCALE, max_norm)
    assert not found_inf
    assert norm == pytest.approx(expected, rel=1e-6)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_cuda_overflow_and_mixed_devices() -> None:
    s = DynamicLossScaler()
    t = torch.ones(10, device="cuda", dtype=torch.float16)
    assert not s.has_overflow([t, torch.ones(3)])
    t[4] = math.inf
    assert s.has_overflow([torch.ones(3), t])
    norm, found = unscale_and_clip_([torch.ones(3), t], 1.0)
    assert found and not math.isfinite(norm)


def test_cuda_fp16_training_tracks_fp32() -> None:
    def run(dtype: torch.dtype) -> list[float]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(128, 32, generator=g).cuda(), torch.randn(128, 8, generator=g).cuda()
        model = model.to(dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        wrapped = MixedPrecisionOptimizer(opt, clip_grad=1.0) if dtype != torch.float32 else None
        losses = []
        for _ in range(30):
            loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
            losses.append(loss.item())
            if wrapped:
                wrapped.backward(loss)
                wrapped.step()
                wrapped.zero_grad()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
        return losses

    ref = run(torch.float32)
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 3e-2)):
        got = run(dtype)
        assert max(abs(a - b) / b for a, b in zip(got, ref, strict=True)) < tol, dtype
