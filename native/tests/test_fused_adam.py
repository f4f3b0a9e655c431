"""ds_native.optim.FusedAdam (CUDA multi-tensor Adam/AdamW).

The kernel tests need a CUDA device and a ds-native built with its CUDA extension; without
either they skip and say which is missing. The argument checks run everywhere.
"""

from __future__ import annotations

import pytest
import torch

import ds_native
from ds_native.optim import CPUAdam, FusedAdam

HAVE_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not HAVE_CUDA, reason="no CUDA device on this machine: FusedAdam's kernel cannot run here"
)


@pytest.fixture(autouse=True)
def _cuda_extension_built(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("cuda") and not ds_native.build_info()["cuda"]:
        pytest.skip("ds-native was built without its CUDA extension (no nvcc or DS_NATIVE_CUDA=OFF)")


def test_cpu_params_are_a_clear_error() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    with pytest.raises(ValueError, match="cuda tensors only"):
        FusedAdam([p]).step()


def _run(opt_cls, params_init, grads, **kw) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(p.clone()) for p in params_init]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}]
    opt = opt_cls(groups, **kw)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("adamw_mode", [True, False], ids=["adamw", "adam"])
def test_fp32_matches_torch_and_cpu_adam(adamw_mode: bool) -> None:
    gen = torch.Generator().manual_seed(21)
    sizes = [0, 1, 7, 1023, 10**6 + 3]
    init = [torch.randn(n, generator=gen) for n in sizes]
    grads = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(100)]
    kw = {"lr": 1e-2, "weight_decay": 0.05}
    ours = _run(
        FusedAdam, [p.cuda() for p in init], [[g.cuda() for g in gs] for gs in grads], adamw_mode=adamw_mode, **kw
    )
    torch_cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    theirs = _run(torch_cls, [p.cuda() for p in init], [[g.cuda() for g in gs] for gs in grads], **kw)
    cpu = _run(CPUAdam, init, grads, adamw_mode=adamw_mode, **kw)
    for a, b, c in zip(ours, theirs, cpu, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # Same IEEE operations as the CPU kernel: expected bitwise equal; allow 1 ulp-ish.
        torch.testing.assert_close(a.cpu(), c, rtol=0, atol=1e-6)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_round_the_fp32_update(dtype: torch.dtype) -> None:
    # Reference: fp32 math on the upcast params with fp32 moments, rounded back each step
    # (exactly what CPUAdam's copy-out computes).
    gen = torch.Generator().manual_seed(22)
    sizes = [3, 1000, 65537]
    init = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    params = [torch.nn.Parameter(p.cuda()) for p in init]
    opt = FusedAdam(params, lr=1e-3, weight_decay=0.01)
    masters = [p.float() for p in init]
    ref = CPUAdam([torch.nn.Parameter(m) for m in masters], lr=1e-3, weight_decay=0.01)
    outs = [torch.empty(n, dtype=dtype) for n in sizes]
    for _ in range(20):
        gs = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
        for p, g in zip(params, gs, strict=True):
            p.grad = g.cuda()
        opt.step()
        ref.step(grads=gs, out=outs)
        for m, o in zip(ref.param_groups[0]["params"], outs, strict=True):
            m.data.copy_(o.float())  # the low-precision param is what the next step starts from
    for p, o in zip(params, outs, strict=True):
        torch.testing.assert_close(p.detach().cpu(), o, rtol=0, atol=float(torch.finfo(dtype).eps))


@pytest.mark.cuda
@needs_cuda
def test_many_tensors_several_launches_on_a_side_stream() -> None:
    gen = torch.Generator().manual_seed(23)
    init = [torch.randn(i % 17 + 1, generator=gen) for i in range(130)]  # > 48 tensors: several launches
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(5)]
    cpu = _run(CPUAdam, init, grads, lr=1e-2)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ours = _run(FusedAdam, [p.cuda() for p in init], [[g.cuda() for g in gs] for gs in grads], lr=1e-2)
    stream.synchronize()
    for a, c in zip(ours, cpu, strict=True):
        torch.testing.assert_close(a.cpu(), c, rtol=0, atol=1e-6)


@pytest.mark.cuda
@needs_cuda
def test_state_dict_moves_to_torch_adamw() -> None:
    p = torch.nn.Parameter(torch.randn(100, device="cuda"))
    opt = FusedAdam([p], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        p.grad = torch.randn(100, device="cuda")
        opt.step()
    torch_opt = torch.optim.AdamW([p])
    torch_opt.load_state_dict(opt.state_dict())
    assert torch_opt.state[p]["step"].item() == 3
    assert torch.equal(torch_opt.state[p]["exp_avg"], opt.state[p]["exp_avg"])
