"""initialize()'s optimizer is a torch.optim.Optimizer: torch schedulers, callable schedulers, DeepSpeed's returns.

Reference for every training comparison: the same model, seed and data trained by plain torch
(torch.optim.SGD/AdamW + the same torch scheduler) in one process; zero-all at ZeRO stage 1 in one
process must give the same parameters (rtol 1e-6: the step is the same arithmetic, only the
parameter storage is flattened).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as tls

import zero_all
from zero_shard import ZeroShardedOptimizer

pytestmark = pytest.mark.timeout(300)
STEPS = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def _batch(step: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(step))


def _loss(model: Any, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).mean()


def _torch_run(make_sched: Callable[[torch.optim.Optimizer], Any]) -> tuple[list[float], list[torch.Tensor]]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = make_sched(opt)
    lrs = []
    for s in range(STEPS):
        opt.zero_grad()
        _loss(model, _batch(s)).backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs, [p.detach().clone() for p in model.parameters()]


def _engine_run(sched_arg: Any, stage: int = 1, build_before: bool = False) -> tuple[list[float], list[torch.Tensor]]:
    model = _model()
    client = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if build_before:
        sched_arg = sched_arg(client)  # a scheduler object built over the client's optimizer
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}}
    engine, *_ = zero_all.initialize(model=model, optimizer=client, lr_scheduler=sched_arg, config=cfg)
    lrs = []
    for s in range(STEPS):
        engine.backward(_loss(engine, _batch(s)))
        engine.step()
        lrs.append(engine.get_lr()[0])
    return lrs, [p.detach().clone() for p in model.parameters()]


SCHEDULES = {
    "LambdaLR": lambda opt: tls.LambdaLR(opt, lambda e: 0.8**e),
    "StepLR": lambda opt: tls.StepLR(opt, step_size=3, gamma=0.5),
    "OneCycleLR": lambda opt: tls.OneCycleLR(opt, max_lr=0.2, total_steps=STEPS + 1),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_torch_scheduler_callable_trains_like_torch(name: str) -> None:
    ref_lrs, ref_params = _torch_run(SCHEDULES[name])
    lrs, params = _engine_run(SCHEDULES[name])
    assert lrs == pytest.approx(ref_lrs, rel=1e-12)
    for a, b in zip(params, ref_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_scheduler_built_over_the_client_optimizer_keeps_scheduling() -> None:
    """DeepSpeed re-points the client's optimizer at the partitions, so a scheduler made before initialize() works."""
    ref_lrs, ref_params = _torch_run(SCHEDULES["StepLR"])
    lrs, params = _engine_run(SCHEDULES["StepLR"], build_before=True)
    assert lrs == pytest.approx(ref_lrs)
    for a, b in zip(params, ref_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_torch_scheduler_over_the_returned_optimizer() -> None:
    """LambdaLR(optimizer) on what initialize() returns (the HF / DeepSpeed-Chat pattern) at stage 2."""
    model = _model()
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
        "zero_optimization": {"stage": 2},
    }
    engine, opt, _, _ = zero_all.initialize(model=model, config=cfg)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, ZeroShardedOptimizer)
    sched = tls.LambdaLR(opt, lambda e: 1.0 / (1 + e))
    for s in range(3):
        engine.backward(_loss(engine, _batch(s)))
        engine.step()
        sched.step()
    assert engine.get_lr() == [pytest.approx(0.01 / 4)]
    assert opt.param_groups is engine.optimizer.inner.param_groups  # one set of groups, shared
    assert opt.defaults["lr"] == 0.01 and "betas" in opt.defaults
    # torch's step hooks run around the ZeRO step, as for any optimizer
    seen = []
    handle = opt.register_step_post_hook(lambda o, a, k: seen.append(type(o).__name__))
    engine.backward(_loss(engine, _batch(9)))
    engine.step()
    handle.remove()
    assert seen == ["ZeroShardedOptimizer"]
    with pytest.raises(NotImplementedError, match="add_param_group"):
        opt.add_param_group({"params": [torch.zeros(1)]})


def test_callable_scheduler_receives_the_basic_optimizer() -> None:
    got: list[Any] = []

    def make(optimizer: Any) -> Any:
        got.append(optimizer)
        return tls.StepLR(optimizer, step_size=1, gamma=0.5)

    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
        "zero_optimization": {"stage": 1},
    }
    engine, _, _, sched = zero_all.initialize(model=_model(), config=cfg, lr_scheduler=make)
    assert got == [engine.optimizer.inner]  # DeepSpeed: client_lr_scheduler(self.basic_optimizer)
    assert isinstance(got[0], torch.optim.Optimizer) and isinstance(sched, tls.StepLR)
    engine.backward(_loss(engine, _batch(0)))
    engine.step()
    assert engine.get_lr() == [pytest.approx(0.005)]


def test_stage0_fp32_returns_the_clients_own_optimizer() -> None:
    model = _model()
    client = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}}
    _, opt, _, _ = zero_all.initialize(model=model, optimizer=client, config=cfg)
    assert opt is client  # as DeepSpeed: stage 0 without fp16/bf16 hands back the basic optimizer
    cfg1 = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}
    model1 = _model()
    client1 = torch.optim.SGD(model1.parameters(), lr=0.1)
    _, opt1, _, _ = zero_all.initialize(model=model1, optimizer=client1, config=cfg1)
    assert isinstance(opt1, ZeroShardedOptimizer) and opt1.inner is client1
    cfg_bf16 = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}}
    model2 = _model()
    client2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    _, opt2, _, _ = zero_all.initialize(model=model2, optimizer=client2, config=cfg_bf16)
    assert isinstance(opt2, ZeroShardedOptimizer)  # mixed precision: the wrapper


def test_optimizer_state_dict_checks_what_it_loads() -> None:
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
        "zero_optimization": {"stage": 1},
    }
    engine, opt, _, _ = zero_all.initialize(model=_model(), config=cfg)
    engine.backward(_loss(engine, _batch(0)))
    engine.step()
    sd = opt.state_dict()
    assert sd["zero_stage"] == 1 and sd["partition_count"] == 1 and sd["global_steps"] == 1
    with pytest.raises(ValueError, match="not a ZeroShardedOptimizer state dict"):
        opt.load_state_dict(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1).state_dict())
    with pytest.raises(ValueError, match="saved zero_stage=2"):
        opt.load_state_dict({**sd, "zero_stage": 2})
    other, *_ = zero_all.initialize(model=nn.Linear(3, 3), config=cfg)
    with pytest.raises(ValueError, match="names/shapes differ"):
        other.optimizer.load_state_dict(sd)


def test_empty_partition_cache() -> None:
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    engine, *_ = zero_all.initialize(model=_model(), config=cfg)
    before = [p.detach().clone() for p in engine.module.parameters()]
    engine.empty_partition_cache()  # stage 0-2: nothing to release, nothing changes
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters(), strict=True))
    calls: list[int] = []
    engine.optimizer.empty_partition_cache = lambda: calls.append(1)  # what a stage-3 optimizer provides
    engine.empty_partition_cache()
    assert calls == [1]


def test_config_may_name_a_torch_scheduler(tmp_path: Any) -> None:
    """DeepSpeed builds "scheduler": {"type": "StepLR"} from torch.optim.lr_scheduler; so do we, checkpoint included."""
    ref_lrs, ref_params = _torch_run(lambda opt: tls.StepLR(opt, step_size=3, gamma=0.5))

    def make() -> Any:
        cfg = {
            "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
            "scheduler": {"type": "StepLR", "params": {"step_size": 3, "gamma": 0.5}},
            "zero_optimization": {"stage": 1},
        }
        return zero_all.initialize(model=_model(), config=cfg)

    engine, _, _, sched = make()
    assert isinstance(sched, tls.StepLR)
    lrs = []
    for s in range(STEPS):
        engine.backward(_loss(engine, _batch(s)))
        engine.step()
        lrs.append(engine.get_lr()[0])
        if s == 4:
            engine.save_checkpoint(tmp_path, tag="mid")
    assert lrs == pytest.approx(ref_lrs)
    for a, b in zip(engine.module.parameters(), ref_params, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)
    resumed, _, _, sched2 = make()
    resumed.load_checkpoint(tmp_path, tag="mid")
    assert sched2.last_epoch == 5 and resumed.get_lr() == [pytest.approx(ref_lrs[4])]
    with pytest.raises(zero_all.ConfigError, match=r"accepted: WarmupLR.*StepLR"):
        zero_all.ZeroAllConfig.load({"scheduler": {"type": "LambdaLR", "params": {}}})
    with pytest.raises(zero_all.ConfigError, match=r"scheduler\.params: StepLR needs step_size"):
        zero_all.ZeroAllConfig.load({"scheduler": {"type": "StepLR", "params": {}}})
