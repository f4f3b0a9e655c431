"""unscale_and_clip_ against torch.amp.GradScaler.unscale_ + torch.nn.utils.clip_grad_norm_.

The numerical tests take the ``device`` fixture (zero-testkit): cpu always, cuda on a machine with a GPU
(there torch's reference is its CUDA GradScaler and foreach clip, and the same bitwise equality must hold).
"""

from __future__ import annotations

import math

import pytest
import torch

from amp_scaler import DynamicLossScaler, GradScaler, global_grad_norm, unscale_and_clip_

SCALE = 2.0**14


def make_params(
    dtype: torch.dtype = torch.float32, seed: int = 0, device: torch.device | str = "cpu"
) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (1,), (4, 4, 3), (33,)]
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        p.grad = (torch.randn(shape, generator=g) * SCALE).to(dtype).to(device)
        params.append(p)
    return params


def torch_reference(params: list[torch.nn.Parameter], max_norm: float, norm_type: float) -> float:
    opt = torch.optim.SGD(params, lr=0.1)
    device = params[0].device
    scaler = torch.amp.GradScaler(device.type, init_scale=SCALE)
    scaler.scale(torch.ones((), device=device))  # GradScaler needs a scale() call before unscale_()
    scaler.unscale_(opt)
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params], norm_type))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.0, 1.0, 1e6])
def test_fp32_bitwise_equal_to_torch(max_norm: float, norm_type: float, device: torch.device) -> None:
    ours, ref = make_params(device=device), make_params(device=device)
    expected = torch_reference(ref, max_norm, norm_type)
    norm, found_inf = unscale_and_clip_([p.grad for p in ours], 1.0 / SCALE, max_norm, norm_type=norm_type)
    assert not found_inf
    assert norm == expected
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a.grad, b.grad)
    if max_norm == 1.0:  # the clip was active
        assert global_grad_norm([p.grad for p in ours], norm_type=norm_type) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_grads_norm_in_fp32(dtype: torch.dtype, device: torch.device) -> None:
    # Scaled fp16 grads whose norm exceeds fp16's range (65504): the norm must still be finite.
    params = make_params(dtype, device=device)
    grads = [p.grad for p in params]
    expected = torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in grads])) / SCALE
    assert expected * SCALE > 65504
    want = [(g.float() / SCALE * min(1.0, 0.5 / (float(expected) + 1e-6))) for g in grads]
    norm, found_inf = unscale_and_clip_(grads, 1.0 / SCALE, max_norm=0.5)
    assert not found_inf
    assert norm == pytest.approx(float(expected), rel=1e-5)
    for g, w in zip(grads, want, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nonfinite_is_found_and_not_clipped(bad: float, dtype: torch.dtype, device: torch.device) -> None:
    params = make_params(dtype, device=device)
    params[2].grad[0] = bad
    before = [p.grad.clone() for p in params]
    norm, found_inf = unscale_and_clip_([p.grad for p in params], 1.0 / SCALE, max_norm=1.0)
    assert found_inf and not math.isfinite(norm)
    # Unscaled only (the step will be skipped): no clip coefficient was applied.
    torch.testing.assert_close(params[0].grad, (before[0].float() / SCALE).to(dtype))


def test_none_grads_mixed_dtypes_and_empty() -> None:
    a = torch.full((10,), 3.0 * SCALE)
    b = torch.full((4,), 2.0 * SCALE, dtype=torch.float16)
    norm, found_inf = unscale_and_clip_([a, None, b], 1.0 / SCALE)
    assert not found_inf
    assert norm == pytest.approx(math.sqrt(10 * 9 + 4 * 4), rel=1e-6)
    assert torch.all(a == 3.0) and torch.all(b == 2.0)
    c = torch.full((4,), 2.0 * SCALE, dtype=torch.float64)
    assert unscale_and_clip_([c], 1.0 / SCALE) == (4.0, False) and torch.all(c == 2.0)
    assert unscale_and_clip_([], 1.0) == (0.0, False)
    assert unscale_and_clip_([None], 1.0, max_norm=1.0) == (0.0, False)


def test_bad_max_norm() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        unscale_and_clip_([torch.ones(2)], 1.0, max_norm=-1.0)


def _train(scaler_kind: str, steps: int = 6, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8).to(device), torch.randn(32, 1).to(device)
    if scaler_kind == "torch":
        scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=2.0**16)
    else:
        scaler = GradScaler()
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if scaler_kind == "torch":
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        else:
            scaler.unscale_(opt, max_norm=0.5)
        scaler.step(opt)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()]


def test_grad_scaler_drop_in_matches_torch_bitwise(device: torch.device) -> None:
    # No overflow in this run, so both keep 2**16 and the updates are bit-identical.
    for a, b in zip(_train("torch", device=device), _train("ours", device=device), strict=True):
        assert torch.equal(a, b)


def test_grad_scaler_skips_overflow_and_halves() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=1.0)

    scaler = GradScaler(DynamicLossScaler(init_scale=1024, hysteresis=1))
    p.grad = torch.tensor([1.0, math.inf, 0.0])
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(3))
    assert scaler.get_scale() == 512 and scaler.skipped_steps == 1
    p.grad = torch.full((3,), 512.0)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.zeros(3))
    with pytest.raises(RuntimeError, match="already been called"):
        p.grad = torch.ones(3)
        scaler.unscale_(opt)
        scaler.unscale_(opt)


def _autocast_fp16_run(kind: str, device: str, steps: int = 20) -> tuple[list[torch.Tensor], list[float], int]:
    """fp32 params, fp16 autocast forward, a first loss scale so large that the fp16 backward overflows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).to(device)
    init = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator(device=device).manual_seed(1)
    if kind == "torch":
        scaler = torch.amp.GradScaler(device, init_scale=2.0**26, growth_interval=1000)
    else:
        # hysteresis=1 and a long window: the same halve-on-overflow rule as torch's for this short run.
        scaler = GradScaler(DynamicLossScaler(init_scale=2.0**26, hysteresis=1, scale_window=1000))
    scales, skipped = [], 0
    for _ in range(steps):
        x = torch.randn(32, 64, device=device, generator=g) * 10
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        before = float(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        skipped += float(scaler.get_scale()) < before
        scales.append(float(scaler.get_scale()))
    moved = sum(not torch.equal(a, b) for a, b in zip(init, model.parameters(), strict=True))
    assert moved == len(init), "the run must also take steps, or the comparison below proves nothing"
    return [p.detach().clone() for p in model.parameters()], scales, skipped


def test_fp16_autocast_overflow_is_detected_as_torch_detects_it(device: torch.device) -> None:
    ours, our_scales, our_skips = _autocast_fp16_run("ours", device.type)
    ref, ref_scales, ref_skips = _autocast_fp16_run("torch", device.type)
    # 2**26 times an fp16 activation gradient overflows: the first steps are skipped, by both alike.
    assert our_skips >= 2 and our_skips == ref_skips
    assert our_scales == ref_scales
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)  # unscale by powers of two is exact: the same steps give the same bits
