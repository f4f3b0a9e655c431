"""A PipelineModule through initialize(): train_batch/eval_batch, ZeRO-1 over the data axis, the rules."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import zero_all
from pipe3d import (
    GPipe,
    Interleaved1F1B,
    OneFOneB,
    PipelineModule,
    PipelineParallelGrid,
    PipeModelDataParallelTopology,
)
from pipe3d.models import Reference, batches, gpt_specs, loss_fn
from zero_testkit import run_distributed

TOL = 1e-5
MICRO, GAS, STEPS, LR = 2, 4, 3, 1e-2


def _config(stage: int, dp: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage},
    }


def _reference(dp: int) -> list[float]:
    ref = Reference(gpt_specs(blocks=2))
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.01)
    losses = []
    for s in range(STEPS):
        mbs = [mb for d in range(dp) for mb in batches(GAS, MICRO, seed=10 * s + d)]
        total = sum(loss_fn(ref(x), y) for x, y in mbs) / len(mbs)
        total.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(total.detach()))
    return losses


def _train(rank: int, world: int, pp: int, stage: int) -> list[float]:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dp = world // pp
    module = PipelineModule(gpt_specs(blocks=2), num_stages=pp, loss_fn=loss_fn, seed_layers=True)
    engine, *_ = zero_all.initialize(model=module, config=_config(stage, dp))
    assert engine.train_batch_size() == MICRO * GAS * dp
    d = module.mpu().get_data_parallel_rank()
    losses = [float(engine.train_batch(iter(batches(GAS, MICRO, seed=10 * s + d)))) for s in range(STEPS)]
    ref = _reference(dp)
    for s in range(STEPS):
        assert abs(losses[s] - ref[s]) <= TOL, (rank, s, losses, ref)
    assert engine.global_steps == STEPS and engine.micro_steps == STEPS * GAS
    ev = float(engine.eval_batch(iter(batches(GAS, MICRO, seed=99))))
    assert ev > 0
    with pytest.raises(RuntimeError, match="train_batch"):
        zero_all.initialize(model=torch.nn.Linear(2, 2), config=_config(0, world))[0].train_batch(iter([]))
    return losses


def test_pipeline_2x2_zero1_matches_single_process() -> None:
    run_distributed(_train, 4, 2, 1, timeout=240)


def _schedules(rank: int, world: int) -> None:
    """ds_config.pipeline.schedule picks what train_batch runs; every schedule matches one process."""
    ref = _reference(1)
    for name, chunks, kind in (("gpipe", 1, GPipe), ("interleaved", 2, Interleaved1F1B), (None, 1, OneFOneB)):
        module = PipelineModule(gpt_specs(blocks=2), num_stages=2, loss_fn=loss_fn, seed_layers=True, num_chunks=chunks)
        # recv_ahead 0 for one of them: posting each receive at its own instruction trains the same.
        extra = {} if name is None else {"schedule": name, "recv_ahead": 0 if name == "gpipe" else 3}
        cfg = {**_config(1, 1), "pipeline": extra}
        engine, *_ = zero_all.initialize(model=module, config=cfg)
        assert type(engine.pipeline.schedule) is kind, (name, engine.pipeline.schedule)
        assert engine.pipeline._executor.recv_ahead == extra.get("recv_ahead", 8)
        losses = [float(engine.train_batch(iter(batches(GAS, MICRO, seed=10 * s)))) for s in range(STEPS)]
        for s in range(STEPS):
            assert abs(losses[s] - ref[s]) <= TOL, (rank, name, s, losses, ref)


def _rules(rank: int, world: int) -> None:
    module = PipelineModule(gpt_specs(blocks=2), num_stages=2, loss_fn=loss_fn)
    with pytest.raises(zero_all.ConfigError, match="stage: 2 with a PipelineModule"):
        zero_all.initialize(model=module, config=_config(2, 1))
    # ds_config.pipeline: DeepSpeed's keys are read, a schedule that does not fit the module is refused.
    with pytest.raises(zero_all.ConfigError, match=r"pipeline\.schedule: 'interleaved' needs virtual stages"):
        zero_all.initialize(model=module, config={**_config(1, 1), "pipeline": {"schedule": "interleaved"}})
    chunked = PipelineModule(gpt_specs(blocks=2), num_stages=2, loss_fn=loss_fn, num_chunks=2)
    with pytest.raises(zero_all.ConfigError, match=r"pipeline\.schedule: 'gpipe' runs one model chunk"):
        zero_all.initialize(model=chunked, config={**_config(1, 1), "pipeline": {"schedule": "gpipe"}})
    with pytest.raises(zero_all.ConfigError, match="multiple of the pipeline stages"):
        zero_all.initialize(model=chunked, config={**_config(1, 1), "gradient_accumulation_steps": 3})
    # 1-bit optimizers communicate over every rank: refused with a pipeline (gloo would abort on the mismatch).
    onebit = {**_config(0, 1), "optimizer": {"type": "OneBitAdam", "params": {"lr": LR}}}
    with pytest.raises(NotImplementedError, match="'OneBitAdam' with a PipelineModule: the 1-bit optimizers are"):
        zero_all.initialize(model=module, config=onebit)
    with pytest.raises(zero_all.ConfigError, match=r"pipeline\.stages: 3, but the PipelineModule has 2"):
        zero_all.initialize(model=module, config={**_config(1, 1), "pipeline": {"stages": 3}})
    deepspeed_keys = {
        "stages": "auto",
        "partition": "best",
        "seed_layers": False,
        "activation_checkpoint_interval": 1,
        "pipe_partitioned": True,
        "grad_partitioned": True,
    }
    assert module.activation_checkpoint_interval == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not implemented" warning for the pipeline key any more
        engine, *_ = zero_all.initialize(model=module, config={**_config(1, 1), "pipeline": deepspeed_keys})
    assert module.activation_checkpoint_interval == 1  # DeepSpeed's engine applies it to the module too
    assert type(engine.pipeline.schedule) is OneFOneB
    module.activation_checkpoint_interval = 0
    # mpu= with a plain model: ZeRO and the batch arithmetic use the grid's data axis.
    grid = PipelineParallelGrid(PipeModelDataParallelTopology(num_pp=1, num_mp=2, num_dp=1))
    engine, *_ = zero_all.initialize(model=torch.nn.Linear(4, 4), config=_config(1, 1), mpu=grid)
    assert engine.train_batch_size() == MICRO * GAS
    assert engine.optimizer.world_size == 1
    dist.barrier()


def _checkpoint(rank: int, world: int, tmp: str) -> None:
    cfg = _config(1, 1)
    module = PipelineModule(gpt_specs(blocks=2), num_stages=2, loss_fn=loss_fn, seed_layers=True)
    engine, *_ = zero_all.initialize(model=module, config=cfg)
    for s in range(2):
        engine.train_batch(iter(batches(GAS, MICRO, seed=s)))
    engine.save_checkpoint(tmp, client_state={"note": "pp2"})
    after = float(engine.train_batch(iter(batches(GAS, MICRO, seed=7))))
    probe = float(engine.eval_batch(iter(batches(GAS, MICRO, seed=8))))

    # Same split: weights, Adam moments and counters come back; the next step is the same step.
    module2 = PipelineModule(gpt_specs(blocks=2), num_stages=2, loss_fn=loss_fn, seed_layers=True, base_seed=99)
    engine2, *_ = zero_all.initialize(model=module2, config=cfg)
    path, client = engine2.load_checkpoint(tmp)
    assert path is not None and path.endswith("global_step2")
    assert client == {"note": "pp2"} and engine2.global_steps == 2
    again = float(engine2.train_batch(iter(batches(GAS, MICRO, seed=7))))
    assert abs(again - after) <= 1e-6, (after, again)

    # Another split: one stage, two data-parallel replicas (ZeRO-1 partitions over them). The layers load by
    # index; the fp32 master, the Adam moments and step come by parameter name from the stage that held them.
    half = GAS // 2  # the same global batch: each replica takes half of the micro-batches
    flat = PipelineModule(gpt_specs(blocks=2), num_stages=1, loss_fn=loss_fn, seed_layers=True, base_seed=5)
    engine3, *_ = zero_all.initialize(model=flat, config={**cfg, "gradient_accumulation_steps": half})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left behind, so nothing to warn about
        engine3.load_checkpoint(tmp, tag="global_step2")
    assert engine3.global_steps == 2
    engine2.load_checkpoint(tmp, tag="global_step2", load_optimizer_states=False)
    d = flat.mpu().get_data_parallel_rank()

    def mine(seed: int) -> list:
        return batches(GAS, MICRO, seed=seed)[d * half : (d + 1) * half]

    # Both models now hold the step-2 weights: the same evaluation loss on the same data.
    a = float(engine2.eval_batch(iter(batches(GAS, MICRO, seed=8))))
    b = float(engine3.eval_batch(iter(mine(8))))
    assert abs(a - b) <= TOL, (a, b)
    assert probe != a  # the probe was taken one step later
    # The next step is the saved run's next step: same loss, and (Adam's moments restored) the same weights.
    again3 = float(engine3.train_batch(iter(mine(7))))
    assert abs(again3 - after) <= TOL, (after, again3)
    probe3 = float(engine3.eval_batch(iter(mine(8))))
    assert abs(probe3 - probe) <= TOL, (probe, probe3)


def _bf16(rank: int, world: int) -> None:
    """bf16 through the pipeline (activations, gradients and tied weights in bf16) tracks fp32."""
    losses = {}
    for bf16 in (False, True):
        module = PipelineModule(gpt_specs(blocks=2), num_stages=2, loss_fn=loss_fn, seed_layers=True)
        engine, *_ = zero_all.initialize(model=module, config={**_config(1, 1), "bf16": {"enabled": bf16}})
        losses[bf16] = [float(engine.train_batch(iter(batches(GAS, MICRO, seed=s)))) for s in range(STEPS)]
    for a, b in zip(losses[False], losses[True], strict=True):
        assert abs(a - b) <= 2e-2, losses


def _two_ranks(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    # One set of processes for the 2-rank cases: starting ranks costs more than a case here.
    _train(rank, world, 2, 1)
    _schedules(rank, world)
    _rules(rank, world)
    _checkpoint(rank, world, tmp)
    _bf16(rank, world)


def test_pipeline_2_ranks_zero1_rules_and_checkpoints(tmp_path) -> None:
    """PP=2 with ZeRO-1 matches one process under each configured schedule; ZeRO-2 and misfit pipeline keys refused;
    mpu= accepted; checkpoints at two splits; bf16."""
    run_distributed(_two_ranks, 2, str(tmp_path), timeout=300)
