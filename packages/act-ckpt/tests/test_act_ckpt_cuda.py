"""act-ckpt on CUDA: RNG streams and replay on the CUDA generator, activations offloaded from CUDA to pinned host
memory and back. Skipped with the reason on a machine without a CUDA device (``pytest -m cuda`` selects them)."""

from __future__ import annotations

import copy

import pytest
import torch
from act_ckpt_models import GPT, assert_grads_close, loss_and_grads

import act_ckpt
from act_ckpt.saved import RegionInputHooks
from zero_testkit import cuda_marks

pytestmark = cuda_marks()


def test_offloaded_inputs_go_to_pinned_host_memory_and_back() -> None:
    hooks = RegionInputHooks(None, offload=True)
    assert hooks.pin_memory  # the default when CUDA is available: the copies can be asynchronous
    x = torch.randn(1000, 33, device="cuda")
    want = x.clone()
    held = hooks._pack(x)
    assert held.host.device.type == "cpu" and held.host.is_pinned()
    # Overwrite the source right away on the same stream: the device-to-host copy was queued first,
    # so the host copy still holds the old values (stream order, not luck).
    x.mul_(-3.0)
    back = hooks._unpack(held)
    assert back.device == x.device
    torch.testing.assert_close(back, want, rtol=0, atol=0)


def test_offloaded_inputs_without_pinning_are_still_correct() -> None:
    hooks = RegionInputHooks(None, offload=True, pin_memory=False)
    x = torch.randn(257, device="cuda")
    held = hooks._pack(x)
    assert not held.host.is_pinned()
    torch.testing.assert_close(hooks._unpack(held), x, rtol=0, atol=0)


@pytest.mark.parametrize(
    "opts",
    [{"cpu_checkpointing": True}, {"cpu_checkpointing": True, "policy": "save_matmuls"}],
    ids=["cpu", "cpu+selective"],
)
def test_cpu_checkpointing_from_cuda_matches_and_moves_the_block_inputs(opts: dict) -> None:
    torch.manual_seed(0)
    model = GPT().cuda()
    ids = torch.randint(0, 64, (2, 16), device="cuda")
    _, ref = loss_and_grads(model, ids)
    ckpt = copy.deepcopy(model)
    act_ckpt.apply_activation_checkpointing(ckpt, **opts)
    with act_ckpt.SavedActivationMeter(ckpt.parameters()) as meter:
        torch.manual_seed(1234)
        out = ckpt(ids)
    live = meter.live()
    out.sum().backward()  # only to free the graph; the gradient check below is a fresh run
    # The three blocks' inputs (batch 2, seq 16, d 32, fp32) now live in host memory, not on the GPU.
    assert live.offloaded == 3 * ids.numel() * 32 * 4
    assert live.resident < live.total
    _, got = loss_and_grads(ckpt, ids)
    assert_grads_close(got, ref, rtol=1e-6)


@pytest.mark.parametrize("random_ops", ["replay", "recompute"])
def test_fused_attention_dropout_on_cuda(random_ops: str) -> None:
    # scaled_dot_product_attention with dropout on CUDA draws inside the fused kernel (Philox seed/offset):
    # recompute must restore the CUDA generator, replay must hand back the forward's results.
    torch.manual_seed(0)
    model = GPT(fused=True).cuda()
    ids = torch.randint(0, 64, (2, 16), device="cuda")
    _, ref = loss_and_grads(model, ids)
    act_ckpt.apply_activation_checkpointing(model, random_ops=random_ops)
    _, got = loss_and_grads(model, ids)
    assert_grads_close(got, ref, rtol=1e-5)


def test_model_parallel_stream_forks_the_cuda_generator() -> None:
    from act_ckpt import checkpointing

    checkpointing.model_parallel_cuda_manual_seed(11)
    tracker = checkpointing.get_cuda_rng_tracker()
    a = torch.rand(64, device="cuda")
    with tracker.fork():
        b = torch.rand(64, device="cuda")
    c = torch.rand(64, device="cuda")
    # The default CUDA stream continues as if the fork never drew; the forked one is seed + 2718.
    torch.cuda.manual_seed(11)
    assert torch.equal(a, torch.rand(64, device="cuda")) and torch.equal(c, torch.rand(64, device="cuda"))
    g = torch.Generator(device="cuda").manual_seed(11 + 2718)
    assert torch.equal(b, torch.rand(64, device="cuda", generator=g))


def test_checkpointed_region_that_forks_replays_the_same_cuda_masks() -> None:
    from act_ckpt import checkpointing

    def region(x: torch.Tensor) -> torch.Tensor:
        with checkpointing.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x, 0.5).sin()

    def run(checkpointed: bool) -> torch.Tensor:
        checkpointing.model_parallel_cuda_manual_seed(5)
        x = torch.randn(4096, device="cuda", requires_grad=True)
        y = checkpointing.checkpoint(region, x) if checkpointed else region(x)
        y.sum().backward()
        return x.grad

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=0)
