"""random_ops="replay": the recompute writes back the forward's random results instead of redrawing them."""

from __future__ import annotations

import copy

import pytest
import torch
from act_ckpt_models import GPT, assert_grads_close, loss_and_grads
from torch import nn
from torch.nn import functional as F

import act_ckpt


@pytest.fixture(scope="module")
def reference() -> tuple[GPT, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT()
    ids = torch.randint(0, 64, (2, 16))
    _, grads = loss_and_grads(model, ids)
    return model, ids, grads


@pytest.mark.parametrize("random_ops", ["replay", "recompute"])
@pytest.mark.parametrize("policy", [None, "save_matmuls", "recompute_attention_core"])
def test_gradients_match_with_dropout(reference, policy: str | None, random_ops: str) -> None:
    model, ids, ref_grads = reference
    m = copy.deepcopy(model)
    act_ckpt.apply_activation_checkpointing(m, policy=policy, random_ops=random_ops)
    _, grads = loss_and_grads(m, ids)
    assert_grads_close(grads, ref_grads, rtol=1e-6)


class _Spy(nn.Module):
    """Dropout, then noise drawn in place and out of place, logging what each run of forward sees.

    ``masks`` gets dropout's mask at every run (the forward, then the recompute); ``rng`` gets the
    CPU generator's state after the dropout: equal in both runs only if the recompute redrew.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.masks: list[torch.Tensor] = []
        self.rng: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(self.lin(x), 0.5, training=True)
        self.masks.append((h != 0).detach().clone())
        self.rng.append(torch.get_rng_state())
        # Random ops that are not 0/1-valued, kept in full: one out of place, one in place.
        h = h + 0.1 * torch.randn_like(h)
        return h * torch.empty_like(h).uniform_(0.5, 1.5)


def _grads(spy: _Spy, x: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(7)
    spy.zero_grad(set_to_none=True)
    x.grad = None
    spy(x).square().sum().backward()
    return [x.grad.clone(), spy.lin.weight.grad.clone(), spy.lin.bias.grad.clone()]


@pytest.mark.parametrize("policy", [None, "save_matmuls"])
def test_replay_writes_back_the_forwards_masks_and_draws_nothing(policy: str | None) -> None:
    torch.manual_seed(0)
    spy = _Spy()
    x = torch.randn(16, 8, requires_grad=True)
    ref = _grads(spy, x)
    replayed, redrawn = copy.deepcopy(spy), copy.deepcopy(spy)
    for m, mode in ((replayed, "replay"), (redrawn, "recompute")):
        m.masks.clear()
        m.rng.clear()
        act_ckpt.checkpoint_wrapper(m, policy=policy, random_ops=mode)
        got = _grads(m, x)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=0)
        assert len(m.masks) == 2, "forward then recompute"
        assert torch.equal(m.masks[0], m.masks[1])
        assert 0 < m.masks[0].sum() < m.masks[0].numel()
    # The recompute starts from the forward's restored RNG state: a redraw advances it as the
    # forward did, a replay leaves it where it was.
    assert torch.equal(redrawn.rng[0], redrawn.rng[1])
    assert not torch.equal(replayed.rng[0], replayed.rng[1])


def test_replayed_bernoulli_masks_are_kept_as_bool(reference) -> None:
    model, ids, _ = reference
    saved = {}
    for mode in ("replay", "recompute"):
        m = copy.deepcopy(model)
        act_ckpt.apply_activation_checkpointing(m, policy="save_matmuls", random_ops=mode)
        with act_ckpt.SavedActivationMeter(m.parameters()) as meter:
            out = m(ids)
        saved[mode] = meter.live().total
        out.sum().backward()
        assert meter.live().total == 0, f"{mode}: kept tensors outlived the backward"
    # Per block: attention dropout over (batch, heads, seq, seq), two dropouts over (batch, seq, d);
    # CPU dropout draws with bernoulli_, kept at one byte per element.
    b, s, heads, d = ids.shape[0], ids.shape[1], 4, 32
    per_block = b * heads * s * s + 2 * b * s * d
    assert saved["replay"] - saved["recompute"] == 3 * per_block


def test_auto_replays_for_selective_policies_on_cpu_only() -> None:
    x = torch.randn(4, 8)
    assert act_ckpt.Checkpointer(policy="save_matmuls")._replays_random_ops((x,))
    assert not act_ckpt.Checkpointer()._replays_random_ops((x,))
    assert not act_ckpt.Checkpointer(policy="save_matmuls", random_ops="recompute")._replays_random_ops((x,))
    assert act_ckpt.Checkpointer(random_ops="replay")._replays_random_ops((x,))
    on_meta = torch.empty(4, 8, device="meta")  # any non-CPU device counts as an accelerator
    assert not act_ckpt.Checkpointer(policy="save_matmuls")._replays_random_ops((on_meta,))


def test_second_backward_of_a_replayed_region_is_refused() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    ckpt = act_ckpt.Checkpointer(random_ops="replay")
    loss = ckpt(lambda t: F.dropout(lin(t), 0.5, training=True).square(), x).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="random_ops='replay' allows one backward"):
        loss.backward()


def test_bad_random_ops_is_named() -> None:
    with pytest.raises(ValueError, match="random_ops must be 'auto', 'recompute' or 'replay'"):
        act_ckpt.Checkpointer(random_ops="save")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", [None, "save_matmuls"])
def test_cuda_replay_of_fused_dropout(policy: str | None) -> None:
    # On CUDA F.dropout is the fused native_dropout (output and bool mask): replayed, both are kept.
    torch.manual_seed(0)
    model = GPT().cuda()
    ids = torch.randint(0, 64, (2, 16), device="cuda")
    _, ref = loss_and_grads(model, ids)
    act_ckpt.apply_activation_checkpointing(model, policy=policy, random_ops="replay")
    _, got = loss_and_grads(model, ids)
    assert_grads_close(got, ref, rtol=1e-6)
