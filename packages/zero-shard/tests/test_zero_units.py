"""Single-process checks: layout arithmetic, the optimizer against torch at world size 1, errors, edge cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import zero_cases as zc
from torch import nn

from amp_scaler import DynamicLossScaler
from zero_shard import (
    CollectiveChoice,
    ZeroConfig,
    ZeroShardedOptimizer,
    choose_collectives,
    consolidate,
    default_optimizer_factory,
)
from zero_shard.flat_buffer import FlatLayout


def _adamw(groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=zc.LR, weight_decay=zc.WD)


def test_layout_partitions_fragments_and_buckets() -> None:
    params = [(f"p{i}", nn.Parameter(torch.zeros(n))) for i, n in enumerate([5, 3, 7])]
    lay = FlatLayout(params, world_size=4)
    assert (lay.numel, lay.padded_numel, lay.partition_numel) == (15, 16, 4)
    assert [lay.partition(r) for r in range(4)] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    # Rank 1 holds p0[4:5], p1[0:3]; rank 3 holds the last 3 elements of p2 plus one padding element.
    assert lay.fragments(1) == [(0, 4, 5), (1, 0, 3)]
    assert lay.fragments(3) == [(2, 4, 7)]
    # Every element of every parameter is held by exactly one rank.
    held = sorted((i, a, b) for r in range(4) for i, a, b in lay.fragments(r))
    for i, s in enumerate(lay.slots):
        assert sum(b - a for j, a, b in held if j == i) == s.numel
    buckets = lay.buckets(8)
    assert [b[2] for b in buckets] == [[2], [1, 0]]  # last parameters first, whole parameters
    spans = sorted((a, b) for a, b, _ in buckets)
    assert spans[0][0] == 0 and spans[-1][1] == 16 and all(x[1] == y[0] for x, y in itertools.pairwise(spans))


def test_bind_params_makes_views_of_the_flat_buffer() -> None:
    model = zc.make_model()
    lay = FlatLayout(list(model.named_parameters()), world_size=2)
    before = [p.detach().clone() for p in model.parameters()]
    flat = lay.flatten(torch.bfloat16)
    lay.bind_params(flat)
    for p, b in zip(model.parameters(), before, strict=True):
        assert p.dtype == torch.bfloat16 and torch.equal(p.float(), b.to(torch.bfloat16).float())
    flat.zero_()
    assert all(p.abs().sum() == 0 for p in model.parameters())


def _reference_run(steps: int, ga: int, clip: float = 0.0) -> tuple[list[float], dict]:
    model = zc.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=zc.LR, weight_decay=zc.WD)
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(ga):
            x, y = zc.batch(step, micro, 0, 1)
            loss = nn.functional.mse_loss(model(x), y) / ga
            loss.backward()
            total += loss.item()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, zc.full_params(model)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_world1_matches_torch_adamw_exactly(stage: int) -> None:
    ref_losses, ref_params = _reference_run(3, 2)
    model, opt = zc.make_zero(stage)
    losses = zc.train_zero(model, opt, 0, 1, range(3), 2, "fp32")
    assert losses == ref_losses
    for k, v in ref_params.items():
        np.testing.assert_array_equal(zc.full_params(model)[k], v)
    assert opt.global_steps == 3 and opt.skipped_steps == 0 and opt.loss_scale == 1.0


@pytest.mark.parametrize("stage", [0, 2])
def test_gradient_clipping_matches_clip_grad_norm(stage: int) -> None:
    ref_losses, ref_params = _reference_run(3, 1, clip=0.05)
    model, opt = zc.make_zero(stage, clip=0.05)
    losses = zc.train_zero(model, opt, 0, 1, range(3), 1, "fp32")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert opt.global_grad_norm is not None and opt.global_grad_norm > 0.05  # clipping was active
    for k, v in ref_params.items():
        np.testing.assert_allclose(zc.full_params(model)[k], v, rtol=1e-5, atol=1e-7)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale() -> None:
    model = zc.make_model()
    scaler = DynamicLossScaler(init_scale=2.0**8, hysteresis=1)
    opt = ZeroShardedOptimizer(
        list(model.named_parameters()), _adamw, ZeroConfig(stage=2), compute_dtype=torch.float16, loss_scaler=scaler
    )
    before = zc.full_params(model)
    x, y = zc.batch(0, 0, 0, 1)
    opt.backward(nn.functional.mse_loss(model(x.half()).float(), y) * float("inf"))
    assert opt.step() is False
    assert opt.skipped_steps == 1 and opt.loss_scale == 2.0**7
    for k, v in before.items():
        np.testing.assert_array_equal(zc.full_params(model)[k], v)
    # The next, finite step goes through on clean (zeroed) gradients.
    opt.backward(nn.functional.mse_loss(model(x.half()).float(), y))
    assert opt.step() is True and np.isfinite(opt.global_grad_norm)


def test_lr_set_on_param_groups_takes_effect() -> None:
    model, opt = zc.make_zero(1)
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = zc.full_params(model)
    zc.train_zero(model, opt, 0, 1, range(2), 1, "fp32")
    for k, v in before.items():
        np.testing.assert_array_equal(zc.full_params(model)[k], v)


def test_param_groups_with_own_hyperparameters() -> None:
    # Decay on weights only, as a typical training script configures it; compare with torch's own groups.
    def groups_of(model: nn.Module, named: bool) -> list[dict]:
        decay = [(n, p) for n, p in model.named_parameters() if p.dim() > 1]
        no_decay = [(n, p) for n, p in model.named_parameters() if p.dim() <= 1]
        pick = (lambda xs: xs) if named else (lambda xs: [p for _, p in xs])
        return [{"params": pick(decay), "weight_decay": 0.1}, {"params": pick(no_decay), "weight_decay": 0.0}]

    ref = zc.make_model()
    ropt = torch.optim.AdamW(groups_of(ref, False), lr=zc.LR)
    model = zc.make_model()
    opt = ZeroShardedOptimizer(groups_of(model, True), lambda g: torch.optim.AdamW(g, lr=zc.LR), ZeroConfig(stage=2))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    for step in range(2):
        x, y = zc.batch(step, 0, 0, 1)
        nn.functional.mse_loss(ref(x), y).backward()
        ropt.step()
        ropt.zero_grad()
        opt.backward(nn.functional.mse_loss(model(x), y))
        opt.step()
    for k, v in zc.full_params(ref).items():
        np.testing.assert_array_equal(zc.full_params(model)[k], v)


def test_consolidate_and_reload_in_process() -> None:
    model, opt = zc.make_zero(2)
    zc.train_zero(model, opt, 0, 1, range(2), 1, "fp32")
    shard = opt.sharded_state()
    full = consolidate([shard])
    for k, v in zc.full_params(model).items():
        np.testing.assert_array_equal(full[k].numpy(), v)
    assert set(consolidate([shard], key="exp_avg")) == set(full)
    # Load into a fresh stage-0 optimizer and take one more step on both: identical.
    model2, opt2 = zc.make_zero(0)
    opt2.load_sharded_state([shard])
    a = zc.train_zero(model, opt, 0, 1, range(2, 3), 1, "fp32")
    b = zc.train_zero(model2, opt2, 0, 1, range(2, 3), 1, "fp32")
    assert a == b


def test_load_rejects_a_different_model() -> None:
    _model, opt = zc.make_zero(1)
    tensors, meta = opt.sharded_state()
    meta = {**meta, "params": {("x" + k): v for k, v in meta["params"].items()}}
    with pytest.raises(ValueError, match="missing"):
        opt.load_sharded_state([(tensors, meta)])
    with pytest.raises(ValueError, match="every saved rank"):
        opt.load_sharded_state([(tensors, {**opt.sharded_state()[1], "world_size": 2})])


def test_unused_parameters() -> None:
    model = zc.make_model()
    extra = nn.Parameter(torch.ones(3))
    named = [*model.named_parameters(), ("extra", extra)]
    opt = ZeroShardedOptimizer(named, _adamw, ZeroConfig(stage=2, ignore_unused_parameters=False))
    x, y = zc.batch(0, 0, 0, 1)
    with pytest.raises(RuntimeError, match="extra"):
        opt.backward(nn.functional.mse_loss(model(x), y))
    model = zc.make_model()
    extra = nn.Parameter(torch.ones(3))
    opt = ZeroShardedOptimizer([*model.named_parameters(), ("extra", extra)], _adamw, ZeroConfig(stage=2))
    opt.backward(nn.functional.mse_loss(model(x), y))
    assert opt.step()
    # Zero gradient, AdamW: only the decoupled weight decay moves it.
    torch.testing.assert_close(extra.detach(), torch.full((3,), 1 - zc.LR * zc.WD))


@pytest.mark.parametrize(
    ("config", "kwargs", "error", "needle"),
    [
        ({"stage": 3}, {}, ValueError, "module="),
        ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, {}, ValueError, "stage 1, 2 or 3"),
        ({"stage": 1, "zero_quantized_gradients": True}, {}, NotImplementedError, "zero_quantized_gradients"),
        ({"stage": 1}, {"compute_dtype": torch.float64}, ValueError, "compute_dtype"),
        ({"stage": 1}, {"gradient_clipping": -1.0}, ValueError, "gradient_clipping"),
        ({"stage": 0}, {"collectives": CollectiveChoice("reduce", "all_gather")}, ValueError, "stage 0"),
        (
            {"stage": 2},
            {"compute_dtype": torch.bfloat16, "grad_accum_dtype": torch.float16},
            ValueError,
            "grad_accum_dtype",
        ),
    ],
)
def test_bad_setup_is_a_clear_error(config: dict, kwargs: dict, error: type, needle: str) -> None:
    model = zc.make_model()
    with pytest.raises(error, match=needle):
        ZeroShardedOptimizer(list(model.named_parameters()), _adamw, ZeroConfig.model_validate(config), **kwargs)


def test_cpu_offload_on_a_cpu_model_is_accepted() -> None:
    model = zc.make_model()
    cfg = ZeroConfig.model_validate({"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}})
    ZeroShardedOptimizer(list(model.named_parameters()), _adamw, cfg)


def test_no_trainable_parameters_or_duplicate_names() -> None:
    model = zc.make_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        ZeroShardedOptimizer(list(model.named_parameters()), _adamw)
    model = zc.make_model()
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="unique"):
        ZeroShardedOptimizer([named[0], ("fc1.weight", named[1][1])], _adamw)


def test_collective_choice_per_backend() -> None:
    assert choose_collectives("gloo", 2, reduce_scatter=True, allgather_partitions=True) == CollectiveChoice(
        "all_reduce", "broadcast"
    )
    assert choose_collectives("nccl", 2, reduce_scatter=True, allgather_partitions=True) == CollectiveChoice(
        "reduce", "all_gather"
    )
    assert choose_collectives("nccl", 0, reduce_scatter=True, allgather_partitions=False).grad == "all_reduce"
    assert choose_collectives("nccl", 1, reduce_scatter=False, allgather_partitions=False) == CollectiveChoice(
        "all_reduce", "broadcast"
    )


def test_default_optimizer_factory() -> None:
    p = nn.Parameter(torch.zeros(4))
    opt = default_optimizer_factory(lr=0.5, weight_decay=0.1)([{"params": [p]}])
    try:
        from ds_native.optim import CPUAdam
    except ImportError:
        assert isinstance(opt, torch.optim.AdamW)
    else:
        assert isinstance(opt, CPUAdam)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize(("dtype", "master_bytes", "param_bytes"), [("fp32", 0, 4), ("bf16", 4, 2), ("fp16", 4, 2)])
def test_master_is_a_copy_only_for_16bit_models(dtype: str, master_bytes: int, param_bytes: int) -> None:
    model, opt = zc.make_zero(1, dtype)
    n = sum(p.numel() for p in model.parameters())
    b = opt.state_bytes()
    assert b["master"] == master_bytes * n and b["params"] == param_bytes * n
    assert all(p.dtype == zc.DTYPES[dtype] for p in model.parameters())


@pytest.mark.parametrize("overlap", [True, False])
def test_stage2_bucket_buffers_stay_bounded(overlap: bool) -> None:
    # 8 buckets (one per tensor). Autograd delivers norm.weight before norm.bias, whose bucket comes first,
    # so one bucket waits filled: at most 2 in flight + 1 waiting + 1 filling, never all 8 buffers at once.
    model, opt = zc.make_zero(2, bucket=40, overlap=overlap)
    assert len(opt.reducer.buckets) == 8
    zc.train_zero(model, opt, 0, 1, range(1), 1, "fp32")
    r = opt.reducer
    assert r.peak_in_flight <= 2 and r.live_bucket_buffers == 0
    assert 1 <= r.peak_bucket_buffers <= (4 if overlap else 2)


def test_merge_shard_sets_loads_state_saved_by_several_optimizers() -> None:
    """A model saved as two parts (two optimizers, as two pipeline stages) loads into one optimizer by name."""
    from zero_shard.checkpoint_state import merge_shard_sets

    torch.manual_seed(0)
    parts = [nn.Linear(4, 8), nn.Linear(8, 2)]
    names = [[(f"{i}.{n}", p) for n, p in part.named_parameters()] for i, part in enumerate(parts)]
    opts = [ZeroShardedOptimizer(named, _adamw, ZeroConfig(stage=1)) for named in names]
    for _step in range(2):
        x = torch.randn(3, 4)
        h = parts[0](x)
        # Each part steps on its own loss (as each stage steps on its own gradients).
        opts[0].backward(h.square().mean())
        opts[1].backward(parts[1](h.detach()).square().mean())
        for opt in opts:
            opt.step()
    sets = [[opt.sharded_state()] for opt in opts]
    # The whole model now, grouped differently: weights in group 0, biases in group 1.
    whole = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    named = dict(whole.named_parameters())
    groups = [
        {"params": [(n, p) for n, p in named.items() if n.endswith("weight")]},
        {"params": [(n, p) for n, p in named.items() if n.endswith("bias")]},
    ]
    merged_opt = ZeroShardedOptimizer(groups, _adamw, ZeroConfig(stage=0))
    merged_opt.load_sharded_state(merge_shard_sets(merged_opt, sets))
    saved = {k: v for s in sets for k, v in consolidate(s, key="exp_avg_sq").items()}
    got = consolidate([merged_opt.sharded_state()], key="exp_avg_sq")
    masters = consolidate([merged_opt.sharded_state()])
    assert set(got) == set(saved) == set(named)
    for n in named:
        torch.testing.assert_close(got[n], saved[n], rtol=0, atol=0)
        torch.testing.assert_close(named[n].detach(), dict(itertools.chain(*names))[n].detach(), rtol=0, atol=0)
        torch.testing.assert_close(masters[n], named[n].detach(), rtol=0, atol=0)
    assert all(s["step"] == 2 for s in merged_opt.inner.state.values())
    with pytest.raises(ValueError, match=r"no parameter named \['1.bias'\]"):
        only_weights = [
            [(t, {**m, "params": {k: v for k, v in m["params"].items() if k != "1.bias"}})] for [(t, m)] in sets
        ]
        merge_shard_sets(merged_opt, only_weights)
