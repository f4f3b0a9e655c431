"""checkpoint() on functions, module wrapping, configure(), the RNG tracker."""

from __future__ import annotations

import copy

import pytest
import torch
from act_ckpt_models import GPT, Block
from torch import nn
from torch.nn import functional as F

import act_ckpt


@pytest.fixture(autouse=True)
def _unconfigured():
    act_ckpt.reset_configuration()
    yield
    act_ckpt.reset_configuration()


def _fn(x, w, *, scale, bias=None, note="ignored"):
    h = F.dropout(torch.tanh(x @ w) * scale, 0.3, training=True)
    if bias is not None:
        h = h + bias
    return h.sum(-1), (h * 2, note)


def _grads_of(run) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(3)
    x = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(5, 6, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    frozen = torch.randn(6)  # requires_grad=False input
    torch.manual_seed(7)
    s, (h2, note) = run(x, w, scale=0.5, bias=bias + frozen, note="kept")
    assert note == "kept"
    (s.square().sum() + h2.sum()).backward()
    return [s.detach(), h2.detach()], [x.grad, w.grad, bias.grad]


@pytest.mark.parametrize(
    "checkpointer",
    [act_ckpt.checkpoint, act_ckpt.Checkpointer(cpu_checkpointing=True), act_ckpt.Checkpointer(policy="save_matmuls")],
    ids=["default", "cpu", "selective"],
)
def test_function_with_kwargs_non_tensors_and_tuple_outputs(checkpointer) -> None:
    ref_out, ref_grads = _grads_of(_fn)
    out, grads = _grads_of(lambda *a, **k: checkpointer(_fn, *a, **k))
    for a, b in zip(out + grads, ref_out + ref_grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_kwargs_named_like_torch_checkpoint_options_reach_fn() -> None:
    def fn(x, context_fn, debug):
        return x * context_fn + debug

    x = torch.ones(3, requires_grad=True)
    y = act_ckpt.checkpoint(fn, x, context_fn=2.0, debug=1.0)
    y.sum().backward()
    assert torch.equal(y, torch.full((3,), 3.0)) and torch.equal(x.grad, torch.full((3,), 2.0))


def test_no_grad_runs_plainly() -> None:
    with torch.no_grad():
        y = act_ckpt.checkpoint(lambda x: x * 2, torch.ones(2))
    assert torch.equal(y, torch.full((2,), 2.0))


# --- module wrapping ---------------------------------------------------------------------------


def test_wrapper_keeps_identity_state_dict_and_copies() -> None:
    block = Block(16, 2, 0.1)
    keys = list(block.state_dict())
    same = act_ckpt.checkpoint_wrapper(block, policy="save_matmuls")
    assert same is block and isinstance(block, Block) and isinstance(block, act_ckpt.CheckpointedModule)
    assert list(block.state_dict()) == keys
    clone = copy.deepcopy(block)
    assert (
        isinstance(clone, act_ckpt.CheckpointedModule) and clone._act_ckpt_checkpointer is block._act_ckpt_checkpointer
    )
    x = torch.randn(2, 4, 16, requires_grad=True)
    torch.manual_seed(1)
    y1 = block(x)
    torch.manual_seed(1)
    y2 = clone(x)
    assert torch.equal(y1, y2)
    act_ckpt.unwrap(block)
    assert type(block) is Block and not hasattr(block, "_act_ckpt_checkpointer")


def test_wrapper_really_checkpoints() -> None:
    block = Block(16, 2, 0.0)
    x = torch.randn(2, 8, 16, requires_grad=True)
    with act_ckpt.SavedActivationMeter(block.parameters()) as plain:
        y1 = block(x * 1)  # the graph (and what it saved) lives as long as its output
    act_ckpt.checkpoint_wrapper(block)
    with act_ckpt.SavedActivationMeter(block.parameters()) as ckpt:
        y2 = block(x * 1)
    assert ckpt.live().total == x.numel() * 4  # only the block's input is kept
    assert plain.live().total > 10 * ckpt.live().total
    del y1, y2
    assert plain.live().total == ckpt.live().total == 0


def test_wrapper_uses_the_default_configured_later() -> None:
    block = act_ckpt.checkpoint_wrapper(Block(16, 2, 0.0))
    act_ckpt.configure({"profile": True})
    act_ckpt.reset_profile()
    block(torch.randn(1, 4, 16, requires_grad=True)).sum().backward()
    assert act_ckpt.profile_summary()["forward"]["count"] == 1


def test_block_types_and_predicates() -> None:
    model = GPT()
    assert act_ckpt.apply_activation_checkpointing(model, block_types=[nn.LayerNorm]) == [
        "blocks.0.ln1",
        "blocks.0.ln2",
        "blocks.1.ln1",
        "blocks.1.ln2",
        "blocks.2.ln1",
        "blocks.2.ln2",
        "ln",
    ]
    model = GPT()
    assert act_ckpt.apply_activation_checkpointing(model, block_types=lambda n, m: n.endswith("attn")) == [
        f"blocks.{i}.attn" for i in range(3)
    ]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"every": 0}, "every must be a positive integer"),
        ({"block_types": [nn.Conv2d]}, "no module matched block_types"),
        ({"block_types": ["Block"]}, "block_types must be module classes"),
        ({"policy": "save_everything"}, "unknown checkpoint policy 'save_everything'"),
    ],
)
def test_apply_errors(kwargs, error) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        act_ckpt.apply_activation_checkpointing(GPT(), **kwargs)


def test_model_without_blocks_is_explained() -> None:
    with pytest.raises(ValueError, match=r"no nn\.ModuleList/nn\.Sequential of blocks"):
        act_ckpt.apply_activation_checkpointing(nn.Linear(2, 2))


# --- configure ---------------------------------------------------------------------------------


def test_configure_from_section() -> None:
    assert not act_ckpt.is_configured()
    ckpt = act_ckpt.configure(
        {"cpu_checkpointing": True, "synchronize_checkpoint_boundary": True}, policy="save_matmuls"
    )
    assert act_ckpt.is_configured() and act_ckpt.get_checkpointer() is ckpt
    assert ckpt.cpu_checkpointing and ckpt.synchronize and ckpt.policy == "save_matmuls"
    act_ckpt.reset_configuration()
    assert not act_ckpt.is_configured() and not act_ckpt.get_checkpointer().cpu_checkpointing


def test_configure_partition_without_group_warns_and_does_not_partition() -> None:
    with pytest.warns(UserWarning, match="no model-parallel group was given"):
        ckpt = act_ckpt.configure({"partition_activations": True})
    assert ckpt.partition_group is None


def test_configure_refuses_inconsistent_and_unknown() -> None:
    with pytest.raises(ValueError, match="contiguous_memory_optimization=true needs"):
        act_ckpt.configure({"contiguous_memory_optimization": True})
    with pytest.raises(ValueError, match=r"activation_checkpointing\.partition: unknown key"):
        act_ckpt.configure({"partition": True})


def test_partition_group_needs_distributed() -> None:
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialized"):
        act_ckpt.Checkpointer(partition_group=object())


# --- RNG tracker -------------------------------------------------------------------------------


def test_fork_draws_its_own_stream_and_leaves_the_default_alone() -> None:
    tracker = act_ckpt.RNGStatesTracker()
    tracker.add("tp", 11)
    torch.manual_seed(5)
    plain = torch.rand(4)
    torch.manual_seed(5)
    with tracker.fork("tp"):
        forked = torch.rand(4)
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(4), plain)
    assert torch.equal(after, plain)  # the default stream did not move during the fork
    g = torch.Generator().manual_seed(11)
    assert torch.equal(torch.rand(4, generator=g), forked)
    with tracker.fork("tp"):
        # The stream resumes where the last fork left it, not from its seed.
        assert torch.equal(torch.rand(4), torch.rand(4, generator=g))


def test_tracker_errors() -> None:
    tracker = act_ckpt.RNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="seed 1 is already used"):
        tracker.add("b", 1)
    with pytest.raises(ValueError, match="stream 'a' already exists"):
        tracker.add("a", 2)
    with pytest.raises(KeyError, match="no stream named 'model-parallel-rng'"), tracker.fork():
        pass


def test_model_parallel_seed_same_outside_different_inside() -> None:
    draws = []
    for tp_rank in (0, 1):
        act_ckpt.model_parallel_manual_seed(42, tp_rank=tp_rank)
        outside = torch.rand(8)
        with act_ckpt.get_rng_tracker().fork():
            inside = torch.rand(8)
        draws.append((outside, inside))
    assert torch.equal(draws[0][0], draws[1][0])
    assert not torch.equal(draws[0][1], draws[1][1])


class _TPDropout(nn.Module):
    """Dropout inside a "model-parallel region": drawn from the tracker's stream."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with act_ckpt.get_rng_tracker().fork():
            h = F.dropout(self.lin(x), 0.5, training=True)
        return F.dropout(h.relu(), 0.2, training=True)


@pytest.mark.parametrize("policy", [None, "save_matmuls"])
def test_recompute_redraws_tracker_masks(policy: str | None) -> None:
    grads = []
    for wrap in (False, True):
        torch.manual_seed(0)
        m = _TPDropout()
        if wrap:
            act_ckpt.checkpoint_wrapper(m, policy=policy)
        act_ckpt.model_parallel_manual_seed(9, tp_rank=1)
        x = torch.randn(16, 8, requires_grad=True)
        m(x).square().sum().backward()
        grads.append((x.grad, m.lin.weight.grad))
    for a, b in zip(*grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


# --- DeepSpeed's deepspeed.checkpointing API ---------------------------------------------------


def test_deepspeed_configure_reads_a_commented_config_file_then_overrides(tmp_path) -> None:
    from act_ckpt import checkpointing

    path = tmp_path / "ds_config.json"
    path.write_text(
        '{\n  "train_batch_size": 8, // comments as DeepSpeed allows\n'
        '  "note": "a // inside a string stays",\n'
        '  "activation_checkpointing": {"cpu_checkpointing": true, /* inline */ "profile": true}\n}\n'
    )
    checkpointing.configure(None, deepspeed_config=str(path), profile=False, synchronize=True)
    assert checkpointing.is_configured()
    ckpt = act_ckpt.get_checkpointer()
    assert ckpt.cpu_checkpointing and ckpt.synchronize and not ckpt.profile and ckpt.partition_group is None
    assert checkpointing.get_cuda_rng_tracker() is act_ckpt.get_rng_tracker()
    x = torch.randn(3, requires_grad=True)
    checkpointing.checkpoint(torch.sin, x).sum().backward()
    torch.testing.assert_close(x.grad, torch.cos(x))
    checkpointing.reset()  # nothing to free; must not fail
    with pytest.raises(ValueError, match=r"contiguous_memory_optimization=true needs"):
        checkpointing.configure(None, contiguous_checkpointing=True)
    with pytest.raises(ValueError, match="deepspeed_config must be a dict or a path"):
        checkpointing.configure(None, deepspeed_config=3)


def test_deepspeed_seed_and_tracker_names() -> None:
    from act_ckpt import checkpointing

    checkpointing.model_parallel_cuda_manual_seed(7)
    a = torch.rand(3)
    with checkpointing.get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(a, torch.rand(3))
    assert torch.equal(b, torch.rand(3, generator=torch.Generator().manual_seed(7 + 2718)))
    assert isinstance(checkpointing.get_cuda_rng_tracker(), checkpointing.CudaRNGStatesTracker)
