"""Gradient clipping and fp16 overflow across pipeline stages and tensor-parallel shards (4 gloo ranks).

The global norm must be the whole model's, each element counted once (tensor-parallel replicated
parameters on tensor rank 0, a tied embedding on its first stage), and every rank must take the same
skip decision. Checked against one process: the dense model with ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zero_all
from pipe3d import LayerSpec, PipelineModule, PipelineParallelGrid, PipeModelDataParallelTopology, TiedLayerSpec
from pipe3d.models import DIM, VOCAB, DenseBlock, Embed, ParallelBlock, Reference, batches, gpt_specs, lm_head, loss_fn
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


def _pp_tp_offload(rank: int, world: int) -> None:
    """PP=2 x TP=2, ZeRO-1, AdamW with clipping: offload_optimizer cpu and nvme give the losses and norms of no
    offload (the offloaded step's norm covers the model-parallel group, replicated copies once)."""
    import tempfile

    grid = PipelineParallelGrid(PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1))
    tp = grid.get_tensor_model_parallel_group()
    runs = {}
    nvme_dir = tempfile.mkdtemp(prefix=f"pp-tp-offload-{rank}-")
    for device in ("none", "cpu", "nvme"):
        module = PipelineModule(_tp_specs(tp), grid=grid, loss_fn=loss_fn, seed_layers=True, partition_method="uniform")
        config = _config(1)
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}}
        config["zero_optimization"]["offload_optimizer"] = {"device": device, "nvme_path": nvme_dir}
        engine, *_ = zero_all.initialize(model=module, config=config)
        losses, norms = [], []
        for s in range(STEPS):
            losses.append(float(engine.train_batch(iter(batches(GAS, MICRO, seed=10 * s)))))
            norms.append(engine.get_global_grad_norm())
        runs[device] = (losses, norms)
    losses, norms = runs["none"]
    assert min(norms) > CLIP, f"the test needs clipping to be active: {norms}"
    for device in ("cpu", "nvme"):
        _check(rank, f"offload {device} loss", runs[device][0], losses, TOL)
        _check(rank, f"offload {device} grad norm", runs[device][1], norms, TOL)


def _four_ranks(rank: int, world: int) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    # One set of processes for the 4-rank cases: starting ranks costs more than a case here.
    _pp_tp_clip(rank, world)
    _pp_dp_clip(rank, world)
    _pp_tp_fp16(rank, world)
    _tp_dp_mpu(rank, world)
    _pp_tp_offload(rank, world)
    with pytest.raises(zero_all.CheckpointError, match="tensor-parallel"):
        grid = PipelineParallelGrid(PipeModelDataParallelTopology(num_pp=1, num_mp=2, num_dp=2))
        engine, *_ = zero_all.initialize(
            model=_TPModel(grid.get_tensor_model_parallel_group()), config=_config(1), mpu=grid
        )
        engine.save_checkpoint("/nonexistent-never-written")


def test_clipping_and_fp16_across_stages_and_tensor_ranks_match_single_process() -> None:
    """PP=2 x TP=2, PP=2 x DP=2 and (mpu=, ZeRO-1 and -3) TP=2 x DP=2 with gradient_clipping: losses and norms equal
    clip_grad_norm_ (1e-5); fp16 skips agree; PP=2 x TP=2 with optimizer offload cpu/nvme equals no offload;
    checkpoints of a plain tensor-parallel model are refused."""
    run_distributed(_four_ranks, 4, timeout=300)


class _TPModel(nn.Module):
    """Embedding, one transformer block (tensor-parallel over ``tp_group``, dense when None), norm, head."""

    def __init__(self, tp_group: object | None) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = Embed()
        torch.manual_seed(2)
        self.block = DenseBlock(DIM, 2) if tp_group is None else ParallelBlock(DIM, 2, tp_group)
        torch.manual_seed(3)
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.embed(x))))


def _tp_dp_mpu(rank: int, world: int) -> None:
    """mpu= with a plain tensor-parallel model, TP=2 x DP=2, ZeRO-1 and ZeRO-3: clipped SGD equals the dense model."""
    grid = PipelineParallelGrid(PipeModelDataParallelTopology(num_pp=1, num_mp=2, num_dp=2))
    tp, d = grid.get_tensor_model_parallel_group(), grid.get_data_parallel_rank()
    ref = _TPModel(None)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    ref_losses, ref_norms = [], []
    for s in range(STEPS):
        mbs = [mb for r in range(2) for mb in batches(GAS, MICRO, seed=10 * s + r)]
        total = sum(loss_fn(ref(x), y) for x, y in mbs) / len(mbs)
        total.backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(float(total.detach()))
    assert min(ref_norms) > CLIP, ref_norms
    for stage in (1, 3):
        model = _TPModel(tp)
        engine, *_ = zero_all.initialize(model=model, config=_config(stage), mpu=grid)
        assert engine.optimizer.stage == stage and engine.optimizer.world_size == 2  # partitioned over the data axis
        norms, losses = [], []
        for s in range(STEPS):
            total = 0.0
            for x, y in batches(GAS, MICRO, seed=10 * s + d):
                loss = loss_fn(engine(x), y)
                engine.backward(loss)
                engine.step()
                total += float(loss.detach()) / GAS
            t = torch.tensor([total])
            torch.distributed.all_reduce(t, group=grid.get_data_parallel_group())
            losses.append(float(t) / 2)
            norms.append(engine.get_global_grad_norm())
        _check(rank, f"stage {stage} TPxDP loss", losses, ref_losses, TOL)
        _check(rank, f"stage {stage} TPxDP grad norm", norms, ref_norms, TOL)
