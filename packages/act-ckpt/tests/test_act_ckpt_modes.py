"""Every checkpointing mode gives the un-checkpointed model's gradients (same seed, dropout on)."""

from __future__ import annotations

import copy

import pytest
import torch
from act_ckpt_models import GPT, assert_grads_close, loss_and_grads
from torch.utils.checkpoint import CheckpointPolicy

import act_ckpt

MODES = {
    "full": {},
    "save_matmuls": {"policy": "save_matmuls"},
    "recompute_attention_core": {"policy": "recompute_attention_core"},
    "cpu_checkpointing": {"cpu_checkpointing": True},
    "cpu+selective": {"cpu_checkpointing": True, "policy": "save_matmuls"},
    "synchronize+profile": {"synchronize": True, "profile": True},
}


@pytest.fixture(scope="module")
def reference() -> tuple[GPT, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT()
    ids = torch.randint(0, 64, (2, 16))
    loss, grads = loss_and_grads(model, ids)
    return model, ids, loss, grads


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_matches_uncheckpointed_gradients(reference, mode: str) -> None:
    model, ids, ref_loss, ref_grads = reference
    ckpt_model = copy.deepcopy(model)
    names = act_ckpt.apply_activation_checkpointing(ckpt_model, **MODES[mode])
    assert names == ["blocks.0", "blocks.1", "blocks.2"]
    loss, grads = loss_and_grads(ckpt_model, ids)
    assert torch.equal(loss, ref_loss)
    assert_grads_close(grads, ref_grads, rtol=1e-6)


@pytest.mark.parametrize("policy", [None, "save_matmuls", "recompute_attention_core"])
def test_fused_attention_with_dropout(policy: str | None) -> None:
    torch.manual_seed(0)
    model = GPT(fused=True)
    ids = torch.randint(0, 64, (2, 16))
    _, ref = loss_and_grads(model, ids)
    act_ckpt.apply_activation_checkpointing(model, policy=policy)
    _, got = loss_and_grads(model, ids)
    assert_grads_close(got, ref, rtol=1e-6)


def test_every_second_block(reference) -> None:
    model, ids, _, ref_grads = reference
    m = copy.deepcopy(model)
    assert act_ckpt.apply_activation_checkpointing(m, every=2) == ["blocks.0", "blocks.2"]
    assert [isinstance(b, act_ckpt.CheckpointedModule) for b in m.blocks] == [True, False, True]
    _, grads = loss_and_grads(m, ids)
    assert_grads_close(grads, ref_grads, rtol=1e-6)


def _save_random_ops_and_matmuls(ctx, op, *args, **kwargs):
    if torch.Tag.nondeterministic_seeded in op.tags or op in act_ckpt.policies.MATMUL_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def test_a_policy_that_saves_random_ops_still_redraws_the_same_masks(reference) -> None:
    # Saved, dropout's in-place bernoulli_ would be skipped in the recompute: the recomputed mask
    # would be uninitialized memory and later random ops would draw from a shifted stream.
    # act-ckpt recomputes random and in-place ops whatever the policy says.
    model, ids, _, ref_grads = reference
    m = copy.deepcopy(model)
    act_ckpt.apply_activation_checkpointing(m, policy=_save_random_ops_and_matmuls)
    _, grads = loss_and_grads(m, ids)
    assert_grads_close(grads, ref_grads, rtol=1e-6)


def test_saved_bytes_by_mode(reference) -> None:
    model, ids, _, _ = reference
    saved = {}
    for mode, opts in {
        "none": None,
        "full": {},
        "save_matmuls": {"policy": "save_matmuls"},
        "cpu": {"cpu_checkpointing": True},
    }.items():
        m = copy.deepcopy(model)
        if opts is not None:
            act_ckpt.apply_activation_checkpointing(m, **opts)
        with act_ckpt.SavedActivationMeter(m.parameters()) as meter:
            out = m(ids)
        saved[mode] = meter.live()
        out.sum().backward()
        assert meter.live().total == 0, f"{mode}: saved tensors outlived the backward"
    block_inputs = 3 * ids.numel() * 32 * 4  # three blocks' inputs, fp32 (batch, seq, d=32)
    assert saved["full"].total < 0.2 * saved["none"].total
    assert saved["full"].total < saved["save_matmuls"].total < saved["none"].total
    assert saved["cpu"].offloaded == block_inputs
    assert saved["cpu"].total == saved["full"].total  # on CPU nothing moves: same bytes, now "offloaded"


def test_profile_counts_forward_and_recompute(reference) -> None:
    model, ids, _, _ = reference
    m = copy.deepcopy(model)
    act_ckpt.apply_activation_checkpointing(m, profile=True)
    act_ckpt.reset_profile()
    loss_and_grads(m, ids)
    summary = act_ckpt.profile_summary()
    assert summary["forward"]["count"] == 3 and summary["recompute"]["count"] == 3
    assert summary["forward"]["seconds"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["full", "save_matmuls", "cpu_checkpointing"])
def test_cuda_modes_match(mode: str) -> None:
    torch.manual_seed(0)
    model = GPT().cuda()
    ids = torch.randint(0, 64, (2, 16), device="cuda")
    _, ref = loss_and_grads(model, ids)
    act_ckpt.apply_activation_checkpointing(model, **MODES[mode])
    _, got = loss_and_grads(model, ids)
    assert_grads_close(got, ref, rtol=1e-6)
