"""Partitioned activations and the model-parallel RNG streams on 2 real gloo ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from act_ckpt_models import Block, assert_grads_close
from torch import nn

import act_ckpt
from act_ckpt import checkpointing
from zero_testkit import run_distributed

D, SEQ, BATCH, LAYERS = 16, 8, 2, 4


class _MPU:
    """A Megatron-style mpu object, as DeepSpeed's configure() takes."""

    def __init__(self, group: object) -> None:
        self.group = group

    def get_model_parallel_group(self) -> object:
        return self.group


def _stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(Block(D, 2, 0.1) for _ in range(LAYERS)))


def _step(model: nn.Sequential, ckpt: Callable[..., torch.Tensor] | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Forward (counting saved bytes), backward; the same input and RNG state on every rank."""
    torch.manual_seed(1)
    x0 = torch.randn(BATCH, SEQ, D, requires_grad=True)
    with act_ckpt.SavedActivationMeter(model.parameters()) as meter:
        x = x0 * 1.0  # a non-leaf input, as a block's input is in a real model
        for block in model:
            x = ckpt(block, x) if ckpt is not None else block(x)
        loss = (x * 0.5).sum()  # saves nothing itself: what is held is the blocks'
    held = meter.live()
    loss.backward()
    assert meter.live().total == 0
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["input"] = x0.grad.clone()
    return dict(held), grads


def _partition_rank(rank: int, world: int) -> dict:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    group = dist.new_group(list(range(world)))
    out = {}
    _, ref = _step(_stack(), None)
    for name, ckpt in {
        "full": act_ckpt.Checkpointer(),
        "partitioned": act_ckpt.Checkpointer(partition_group=group),
        "partitioned+cpu": act_ckpt.Checkpointer(partition_group=group, cpu_checkpointing=True),
        "selective": act_ckpt.Checkpointer(policy="save_matmuls"),
        "partitioned+selective": act_ckpt.Checkpointer(partition_group=group, policy="save_matmuls"),
    }.items():
        held, grads = _step(_stack(), ckpt)
        assert_grads_close(grads, ref, rtol=1e-6)
        out[name] = held

    # DeepSpeed's API: configure(mpu_, partition_activations=True), then checkpoint(fn, *args).
    checkpointing.configure(_MPU(group), partition_activations=True)
    assert checkpointing.is_configured()
    held, grads = _step(_stack(), checkpointing.checkpoint)
    assert_grads_close(grads, ref, rtol=1e-6)
    out["deepspeed-api"] = held

    # RNG: the default stream agrees across model-parallel ranks, the tracker's stream differs.
    checkpointing.model_parallel_cuda_manual_seed(1234)
    outside = torch.rand(6)
    with checkpointing.get_cuda_rng_tracker().fork():
        inside = torch.rand(6)
    out["draws"] = (outside.tolist(), inside.tolist())  # plain lists: tensors cannot outlive the rank
    return out


def test_partitioned_activations_halve_saved_bytes_and_keep_gradients() -> None:
    ranks = run_distributed(_partition_rank, 2, timeout=120)
    block_inputs = LAYERS * BATCH * SEQ * D * 4  # fp32 bytes of the 4 blocks' inputs
    for r in ranks:
        full, part = r["full"]["total"], r["partitioned"]["total"]
        assert full == block_inputs
        # Measured, per rank: each rank holds half of every saved block input.
        assert part == block_inputs // 2, (part, full)
        assert r["partitioned+cpu"]["offloaded"] == block_inputs // 2
        assert r["deepspeed-api"]["total"] == block_inputs // 2
        # Selective keeps matmul outputs whole; only the block inputs are split.
        assert r["selective"]["total"] - r["partitioned+selective"]["total"] == block_inputs // 2
    (out0, in0), (out1, in1) = ranks[0]["draws"], ranks[1]["draws"]
    assert out0 == out1, "dropout outside model-parallel regions must agree across ranks"
    assert in0 != in1, "dropout inside model-parallel regions must differ across ranks"
