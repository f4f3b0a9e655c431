"""``engine.set_gradient_accumulation_boundary`` and ``engine.backward(scale_wrt_gas=False)`` (DeepSpeed's), vs torch.

A caller that decides the boundaries (the Hugging Face Trainer: an epoch's last accumulation can be
shorter) steps the optimizer where it says, and with ``scale_wrt_gas=False`` the gradient is the plain
sum of the backward losses. Checked against torch SGD (whose step, unlike Adam's, depends on the gradient's scale) on a copy of the model, 1 and 2 gloo ranks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from zero_testkit import run_distributed


def boundary_case(rank: int, world_size: int, stage: int) -> dict:
    import torch.distributed as dist

    import zero_all

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)  # SGD: the gradient scale matters
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
        "zero_optimization": {"stage": stage},
    }
    engine, *_ = zero_all.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), config=cfg
    )
    gen = torch.Generator().manual_seed(100 + rank)
    steps = []
    # Accumulations of 3, then a short one of 2 (boundary forced), then 3 again.
    for length in (3, 2, 3):
        for i in range(length):
            x = torch.randn(2, 6, generator=gen)
            loss = engine(x).pow(2).mean() / length  # the caller's own normalisation
            engine.set_gradient_accumulation_boundary(i == length - 1)
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
            # The reference: the same sum of gradients, averaged over ranks as DDP does.
            (ref(x).pow(2).mean() / length).backward()
        for p in ref.parameters():
            if world_size > 1:
                dist.all_reduce(p.grad)
                p.grad /= world_size
        ref_opt.step()
        ref_opt.zero_grad()
        steps.append(engine.global_steps)
    engine.set_gradient_accumulation_boundary(None)  # back to counting micro steps
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters(), strict=True))
    return {"steps": steps, "max_diff": diff, "counting": engine.is_gradient_accumulation_boundary()}


@pytest.mark.parametrize(("world_size", "stage"), [(1, 0), (2, 2)])
def test_forced_boundaries_and_unscaled_backward_match_torch(world_size: int, stage: int) -> None:
    for res in run_distributed(boundary_case, world_size, stage, timeout=120):
        assert res["steps"] == [1, 2, 3]  # one optimizer step per accumulation, the short one included
        assert res["max_diff"] <= 1e-6, res
        # After 8 micro steps, counting again: micro step 9 is a boundary of 3.
        assert res["counting"] is True
