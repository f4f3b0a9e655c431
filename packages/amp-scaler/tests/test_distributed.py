"""Two gloo ranks: overflow on one rank makes both skip; sharded norms equal the full norm."""

from __future__ import annotations

import math

import torch

from zero_testkit import run_distributed


def full_grads() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g) * 1024 for n in (5, 17, 3, 40, 8, 1)]


def checks(rank: int, world_size: int) -> dict:
    from amp_scaler import DynamicLossScaler, unscale_and_clip_

    out: dict = {}
    # 1. has_overflow agrees across ranks although only rank 1 sees the inf.
    scaler = DynamicLossScaler(init_scale=1024, hysteresis=1)
    t = torch.ones(4)
    if rank == 1:
        t[2] = math.inf
    out["overflow_one_rank"] = scaler.has_overflow([t])
    out["overflow_none"] = scaler.has_overflow([torch.ones(4)])
    scaler.update_scale(out["overflow_one_rank"])
    out["scale_after"] = scaler.loss_scale

    # 2. Sharded norm + clip: each rank passes its half of the tensors; rank 1's last shard is empty.
    grads = full_grads()
    mine = [g.clone() for i, g in enumerate(grads) if i % world_size == rank]
    norm, found = unscale_and_clip_(mine, 1 / 1024, max_norm=1.0)
    out["sharded"] = (norm, found, [g.tolist() for g in mine])
    norm_inf, _ = unscale_and_clip_([g.clone() for g in grads[rank::world_size]], 1 / 1024, norm_type=math.inf)
    out["sharded_inf_norm"] = norm_inf
    # A rank with nothing at all still joins the collective.
    empty_norm, _ = unscale_and_clip_([] if rank == 1 else [g.clone() for g in grads], 1 / 1024)
    out["one_rank_empty"] = empty_norm

    # 3. nan in rank 0's shard only: both ranks see found_inf.
    shard = [g.clone() for g in grads[rank::world_size]]
    if rank == 0:
        shard[0][1] = math.nan
    out["nan_one_rank"] = unscale_and_clip_(shard, 1 / 1024, max_norm=1.0)[1]

    # 4. Replicated grads (DDP-style): the norm stays local, the overflow is still agreed.
    rep = [g.clone() for g in grads]
    out["replicated_norm"] = unscale_and_clip_(rep, 1 / 1024, sharded=False)[0]
    rep = [g.clone() for g in grads]
    if rank == 1:
        rep[3][0] = math.inf
    out["replicated_overflow"] = unscale_and_clip_(rep, 1 / 1024, sharded=False)[1]

    # 5. Model parallelism: each rank holds part of one replica (sharded=False over the data group,
    # summed over model_parallel_group); rank 1 also holds a copy of grads[0], which rank 0 counts.
    mine = [g.clone() for g in grads[rank::world_size]]
    copy = [grads[0].clone()] if rank == 1 else []
    norm, found = unscale_and_clip_(mine, 1 / 1024, 1.0, sharded=False, model_parallel_group=None, replicated=copy)
    out["mp_local_norm"] = norm  # without the group: this rank's counted part only
    mine = [g.clone() for g in grads[rank::world_size]]
    copy = [grads[0].clone()] if rank == 1 else []
    world = torch.distributed.group.WORLD
    norm, found = unscale_and_clip_(mine, 1 / 1024, 1.0, sharded=False, model_parallel_group=world, replicated=copy)
    out["mp"] = (norm, found, [g.tolist() for g in mine], [g.tolist() for g in copy])
    bad = [grads[0].clone()] if rank == 1 else []
    if rank == 1:
        bad[0][0] = math.inf  # only in the copy the norm leaves out
    found = unscale_and_clip_(
        [g.clone() for g in grads[rank::world_size]],
        1 / 1024,
        1.0,
        sharded=False,
        model_parallel_group=world,
        replicated=bad,
    )[1]
    out["mp_replicated_overflow"] = found
    return out


def test_two_ranks_agree() -> None:
    r0, r1 = run_distributed(checks, 2, timeout=120)
    for r in (r0, r1):
        assert r["mp_replicated_overflow"] is True
        assert r["overflow_one_rank"] is True
        assert r["overflow_none"] is False
        assert r["scale_after"] == 512
        assert r["nan_one_rank"] is True
        assert r["replicated_overflow"] is True

    # Single-process reference for the sharded norm and clip.
    grads = full_grads()
    ref_norm = float(torch.linalg.vector_norm(torch.cat(grads))) / 1024
    assert r0["sharded"][0] == r1["sharded"][0]
    assert math.isclose(r0["sharded"][0], ref_norm, rel_tol=1e-6)
    assert r0["sharded"][1] is False and r1["sharded"][1] is False
    coef = 1.0 / (ref_norm + 1e-6)
    shards = {0: r0["sharded"][2], 1: r1["sharded"][2]}
    for i, g in enumerate(grads):
        got = torch.tensor(shards[i % 2][i // 2])
        torch.testing.assert_close(got, g / 1024 * coef, rtol=1e-6, atol=1e-7)
    ref_inf = max(float(g.abs().max()) for g in grads) / 1024
    assert r0["sharded_inf_norm"] == r1["sharded_inf_norm"] == ref_inf
    assert math.isclose(r0["one_rank_empty"], ref_norm, rel_tol=1e-6) and r0["one_rank_empty"] == r1["one_rank_empty"]
    assert (
        math.isclose(r0["replicated_norm"], ref_norm, rel_tol=1e-6) and r0["replicated_norm"] == r1["replicated_norm"]
    )

    # Model parallelism: the whole replica's norm, grads[0] counted once; every part (copy too) clipped.
    coef = min(1.0, 1.0 / (ref_norm + 1e-6))
    for rank, r in enumerate((r0, r1)):
        norm, found, mine, copy = r["mp"]
        assert not found and abs(norm - ref_norm) <= 1e-5 * ref_norm, (rank, norm, ref_norm)
        assert r["mp_local_norm"] < ref_norm
        for got, g in zip(mine + copy, grads[rank::2] + ([grads[0]] if rank == 1 else []), strict=True):
            torch.testing.assert_close(torch.tensor(got), g / 1024 * coef, rtol=1e-5, atol=1e-7)
