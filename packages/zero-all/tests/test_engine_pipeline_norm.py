"""Gradient clipping and fp16 overflow across pipeline stages and tensor-parallel shards (4 gloo ranks).

The global norm must be the whole model's, each element counted once (tensor-parallel replicated
parameters on tensor rank 0, a tied embedding on its first stage), and every rank must take the same
skip decision. Checked against one process: the dense model with ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import zero_all
from pipe3d import LayerSpec, PipelineModule, PipelineParallelGrid, PipeModelDataParallelTopology, TiedLayerSpec
from pipe3d.models import DIM, DenseBlock, Embed, ParallelBlock, Reference, batches, gpt_specs, lm_head, loss_fn
from zero_testkit import run_distributed

TOL = 1e-5  # fp32 losses and norms against the single process
MICRO, GAS, STEPS, LR, CLIP = 2, 2, 3, 0.2, 0.5


def _config(stage: int, **extra: object) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "optimizer": {"type": "SGD", "params": {"lr": LR}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": CLIP,
        **extra,
    }


def _tp_specs(tp_group: object | None) -> list:
    """Tied embedding / LM head around two blocks (tensor-parallel over ``tp_group``, dense when None)."""
    block = (
        (lambda: LayerSpec(DenseBlock, DIM, 2))
        if tp_group is None
        else (lambda: LayerSpec(ParallelBlock, DIM, 2, tp_group))
    )
    return [
        TiedLayerSpec("embed", Embed),
        block(),
        block(),
        LayerSpec(nn.LayerNorm, DIM),
        TiedLayerSpec("embed", Embed, forward_fn=lm_head),
    ]


def _reference(specs: list, dp: int, steps: int = STEPS) -> tuple[list[float], list[float]]:
    """Losses and pre-clip norms of plain torch: SGD on the mean over the replicas' micro-batches."""
    ref = Reference(specs)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    losses, norms = [], []
    for s in range(steps):
        mbs = [mb for d in range(dp) for mb in batches(GAS, MICRO, seed=10 * s + d)]
        total = sum(loss_fn(ref(x), y) for x, y in mbs) / len(mbs)
        total.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(float(total.detach()))
    return losses, norms


def _check(rank: int, what: str, got: list[float], want: list[float], tol: float) -> None:
    for s, (a, b) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= tol * max(1.0, abs(b)), f"rank {rank} {what} step {s}: {got} vs {want}"


def _pp_tp_clip(rank: int, world: int) -> None:
    """PP=2 x TP=2, ZeRO-1: tied weights across stages and replicated norms/biases across TP ranks."""
    grid = PipelineParallelGrid(PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1))
    tp = grid.get_tensor_model_parallel_group()
    module = PipelineModule(_tp_specs(tp), grid=grid, loss_fn=loss_fn, seed_layers=True, partition_method="uniform")
    engine, *_ = zero_all.initialize(model=module, config=_config(1))
    losses, norms = [], []
    for s in range(STEPS):
        losses.append(float(engine.train_batch(iter(batches(GAS, MICRO, seed=10 * s)))))
        norms.append(engine.get_global_grad_norm())
    ref_losses, ref_norms = _reference(_tp_specs(None), 1)
    assert min(ref_norms) > CLIP, f"the test needs clipping to be active: {ref_norms}"
    _check(rank, "loss", losses, ref_losses, TOL)
    _check(rank, "grad norm", norms, ref_norms, TOL)


def _pp_dp_clip(rank: int, world: int) -> None:
    """PP=2 x DP=2, ZeRO-1 (norm summed over the data partitions, then over the stages) and ZeRO-0."""
    for stage in (1, 0):
        module = PipelineModule(gpt_specs(blocks=2), num_stages=2, loss_fn=loss_fn, seed_layers=True)
        engine, *_ = zero_all.initialize(model=module, config=_config(stage))
        d = module.mpu().get_data_parallel_rank()
        losses, norms = [], []
        for s in range(STEPS):
            losses.append(float(engine.train_batch(iter(batches(GAS, MICRO, seed=10 * s + d)))))
            norms.append(engine.get_global_grad_norm())
        ref_losses, ref_norms = _reference(gpt_specs(blocks=2), 2)
        assert min(ref_norms) > CLIP, ref_norms
        _check(rank, f"stage {stage} loss", losses, ref_losses, TOL)
        _check(rank, f"stage {stage} grad norm", norms, ref_norms, TOL)


def _pp_tp_fp16(rank: int, world: int) -> None:
    """fp16 at PP=2 x TP=2: an inf on one rank's replicated gradient skips the step everywhere; then tracks fp32."""
    grid = PipelineParallelGrid(PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1))
    tp = grid.get_tensor_model_parallel_group()
    module = PipelineModule(_tp_specs(tp), grid=grid, loss_fn=loss_fn, seed_layers=True, partition_method="uniform")
    fp16 = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1, "loss_scale_window": 1000}
    engine, *_ = zero_all.initialize(model=module, config=_config(1, fp16=fp16))
    before = [p.detach().clone() for p in module.parameters()]
    handle = None
    if grid.get_stage_id() == 0 and grid.get_tensor_model_parallel_rank() == 1:
        # A replicated parameter (the block's row-parallel bias): left out of the norm on this rank,
        # so only the overflow check can see it.
        block = next(m for m in module.modules() if isinstance(m, ParallelBlock))
        assert not getattr(block.o.bias, "tensor_model_parallel", False)
        handle = block.o.bias.register_hook(lambda g: torch.full_like(g, math.inf))
    engine.train_batch(iter(batches(GAS, MICRO, seed=123)))
    if handle is not None:
        handle.remove()
    assert engine.was_step_skipped() and engine.skipped_steps == 1, f"rank {rank}: step not skipped"
    assert engine.loss_scale == 2.0**7, f"rank {rank}: loss scale {engine.loss_scale}"
    for p, b in zip(module.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b), f"rank {rank}: a parameter changed in a skipped step"
    losses = [float(engine.train_batch(iter(batches(GAS, MICRO, seed=10 * s)))) for s in range(STEPS)]
    assert not engine.was_step_skipped()
    ref_losses, _ = _reference(_tp_specs(None), 1)
    _check(rank, "fp16 loss", losses, ref_losses, 2e-2)


def _four_ranks(rank: int, world: int) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    # One set of processes for the 4-rank cases: starting ranks costs more than a case here.
    _pp_tp_clip(rank, world)
    _pp_dp_clip(rank, world)
    _pp_tp_fp16(rank, world)


def test_clipping_and_fp16_across_stages_and_tensor_ranks_match_single_process() -> None:
    """PP=2 x TP=2 and PP=2 x DP=2 with gradient_clipping: losses and norms equal clip_grad_norm_ (1e-5); fp16 skips agree."""
    run_distributed(_four_ranks, 4, timeout=300)
