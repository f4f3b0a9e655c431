"""ds-native's kernels on every device torch has here: the l2 norm on cpu and cuda, FusedAdam against torch's
own CUDA AdamW (fused and foreach) on a small training run, and the multi-GPU device handling.

The cuda cases are collected everywhere and skip with the reason (no device, or a ds-native built
without its CUDA extension); ``pytest -m cuda`` selects them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

import ds_native
from ds_native.optim import FusedAdam
from zero_testkit import device_params, ds_native_cuda_only, ds_native_cuda_skip_reason, gpu_count


def _reference_norm(tensors: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.cat([t.double().flatten().cpu() for t in tensors])).item()


@pytest.mark.parametrize("device", device_params(ds_native_cuda=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_l2_norm_on_each_device(device: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    # Empty tensors, odd sizes, one larger than a slice, and more tensors than one launch takes (64).
    sizes = [0, 1, 3, 65536, 65537, 2_000_003, *[i % 9 for i in range(150)]]
    tensors = [torch.randn(n, generator=gen).to(dtype).to(device) for n in sizes]
    # fp32 squares accumulated in double on either device: ~1e-6 relative to a float64 reference.
    assert ds_native.multi_tensor_l2_norm(tensors) == pytest.approx(_reference_norm(tensors), rel=1e-6)


@ds_native_cuda_only
def test_l2_norm_refuses_mixed_devices() -> None:
    with pytest.raises(ValueError, match="tensor 1: on cpu"):
        ds_native.multi_tensor_l2_norm([torch.ones(3, device="cuda"), torch.ones(3)])


def _train(make_opt, steps: int = 25) -> list[torch.Tensor]:
    """A small MLP on CUDA, same seed and data for every optimizer; returns the final parameters."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.LayerNorm(256), torch.nn.Linear(256, 16)
    ).cuda()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = make_opt([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": 3e-3}])
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        x = torch.randn(128, 64, device="cuda", generator=g)
        y = torch.randn(128, 16, device="cuda", generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in model.parameters()]


@ds_native_cuda_only
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_fused_adam_trains_as_torch_adamw_on_cuda(impl: str) -> None:
    kw = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    ours = _train(lambda groups: FusedAdam(groups, adamw_mode=True, **kw))
    theirs = _train(lambda groups: torch.optim.AdamW(groups, **kw, **{impl: True}))
    # Same formula in fp32; the only differences are where FMAs fuse and how torch rounds its bias
    # correction: 25 steps stay within a few fp32 ulps of the parameter scale.
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@ds_native_cuda_only
def test_fused_adam_bf16_params_track_torch_fused_adamw() -> None:
    # torch's fused AdamW on bf16 params also computes in fp32 and rounds each step, but keeps bf16 moments
    # (ours are fp32): after 10 steps the two stay within a couple of bf16 ulps (2**-7 relative).
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(4097, generator=gen).to(torch.bfloat16)
    grads = [torch.randn(4097, generator=gen).to(torch.bfloat16) for _ in range(10)]
    out = []
    kw = {"lr": 1e-2, "weight_decay": 0.01}
    for make in (lambda p: FusedAdam([p], **kw), lambda p: torch.optim.AdamW([p], **kw, fused=True)):
        p = torch.nn.Parameter(init.clone().cuda())
        opt = make(p)
        for g in grads:
            p.grad = g.cuda()
            opt.step()
        out.append(p.detach().float().cpu())
    torch.testing.assert_close(out[0], out[1], rtol=2**-6, atol=2**-9)


@pytest.mark.cuda
@pytest.mark.skipif(
    ds_native_cuda_skip_reason() is not None or gpu_count() < 2,
    reason=ds_native_cuda_skip_reason() or f"needs 2 CUDA devices, {gpu_count()} visible",
)
def test_fused_adam_runs_on_the_params_device_not_the_current_one() -> None:
    # Params on cuda:1 while cuda:0 is current: the launch must go to cuda:1's stream.
    p = torch.nn.Parameter(torch.randn(1000, device="cuda:1"))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = FusedAdam([p], lr=1e-2, weight_decay=0.01)
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.01)
    with torch.cuda.device(0):
        for _ in range(3):
            p.grad = torch.ones_like(p)
            ref.grad = torch.ones_like(ref)
            opt.step()
            torch_opt.step()
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
