"""ZeRO stages 0/1/2 against torch DDP + AdamW, per-rank memory, and resharding checkpoints (2 and 4 gloo ranks).

Spawning ranks dominates the cost, so each world size runs once (module fixtures) and the tests below
check its results. Tolerances: fp32 1e-5 relative (losses and parameters); bf16/fp16 against the fp32
reference: losses 2e-2 relative, parameters within 2·lr per step (Adam moves a parameter by about lr per
step, so a rounding-induced sign flip of a tiny gradient costs at most 2·lr). Across stages 0/1/2 the
16-bit runs must agree exactly: one code path for the numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import zero_cases as zc

from zero_testkit import run_distributed

STEPS = 3
ALL_CASES = [(s, d, ga) for s in (0, 1, 2) for d in ("fp32", "bf16", "fp16") for ga in (1, 4)]
# Stage 2 with 16-bit models and an fp32 gradient partition (data_types.grad_accum_dtype = "fp32").
FP32_ACCUM_CASES = [(2, d, ga, "fp32-accum") for d in ("bf16", "fp16") for ga in (1, 4)]
W4_CASES = [(s, d, ga) for s in (0, 1, 2) for d, ga in (("fp32", 1), ("fp32", 4), ("bf16", 1))]


@pytest.fixture(scope="module")
def world2() -> list[dict[Any, Any]]:
    return run_distributed(zc.run_world, 2, ALL_CASES + FP32_ACCUM_CASES, STEPS, None, timeout=240)


@pytest.fixture(scope="module")
def world4(world2: list[dict[Any, Any]]) -> list[dict[Any, Any]]:
    shards = [r["shard"] for r in world2]
    return run_distributed(zc.run_world, 4, W4_CASES, STEPS, (shards, 3, 3, 1), timeout=240)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _check_case(res: dict[Any, Any], case: tuple[Any, ...]) -> None:
    _stage, dtype, ga = case[:3]
    ref, got = res[("ddp", ga)], res[case]
    assert got["skipped"] == 0
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"], strict=True))
    if dtype == "fp32":
        assert loss_rel <= 1e-5, (case, got["losses"], ref["losses"])
        for k, v in ref["params"].items():
            assert _rel(got["params"][k], v) <= 1e-5, (case, k)
    else:
        assert loss_rel <= 2e-2, (case, got["losses"], ref["losses"])
        for k, v in ref["params"].items():
            assert np.abs(got["params"][k] - v).max() <= 2 * zc.LR * STEPS, (case, k)
    # Not a no-op: the parameters moved away from their initial values.
    init = zc.full_params(zc.make_model())
    assert max(np.abs(got["params"][k] - init[k]).max() for k in init) > 0.5 * zc.LR


@pytest.mark.parametrize(
    "case", ALL_CASES + FP32_ACCUM_CASES, ids=lambda c: f"stage{c[0]}-{c[1]}-ga{c[2]}" + "".join(f"-{x}" for x in c[3:])
)
def test_matches_ddp_world2(world2: list[dict[Any, Any]], case: tuple[int, str, int]) -> None:
    _check_case(world2[0], case)


@pytest.mark.parametrize("case", W4_CASES, ids=lambda c: f"stage{c[0]}-{c[1]}-ga{c[2]}")
def test_matches_ddp_world4(world4: list[dict[Any, Any]], case: tuple[int, str, int]) -> None:
    _check_case(world4[0], case)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_stages_agree_exactly(world2: list[dict[Any, Any]], dtype: str) -> None:
    # Every stage reduces the same buckets the same way: bit-identical runs (with accumulation stage 2
    # averages each micro-step before summing them, so it is compared with DDP only). A 16-bit stage 2
    # rounds its gradient partition to the model's dtype by default; with an fp32 partition it is exact.
    res = world2[0]
    stage2 = (2, dtype, 1) if dtype == "fp32" else (2, dtype, 1, "fp32-accum")
    for key, ga in (((1, dtype, 1), 1), (stage2, 1), ((1, dtype, 4), 4)):
        base = res[(0, dtype, ga)]
        got = res[key]
        assert got["losses"] == base["losses"]
        for k, v in base["params"].items():
            np.testing.assert_array_equal(got["params"][k], v)


def test_16bit_gradient_partition_rounds_once_per_reduction(world2: list[dict[Any, Any]]) -> None:
    # The default 16-bit partition is not a no-op: it changes the numbers (slightly) against fp32.
    res = world2[0]
    for dtype in ("bf16", "fp16"):
        rounded, exact = res[(2, dtype, 1)], res[(2, dtype, 1, "fp32-accum")]
        assert any(not np.array_equal(rounded["params"][k], v) for k, v in exact["params"].items())


def test_ranks_hold_identical_models(world2: list[dict[Any, Any]]) -> None:
    for case in ALL_CASES + FP32_ACCUM_CASES:
        for k, v in world2[0][case]["params"].items():
            np.testing.assert_array_equal(world2[1][case]["params"][k], v)


@pytest.mark.parametrize("world", [2, 4])
def test_state_bytes_are_one_nth(world2: list[dict[Any, Any]], world4: list[dict[Any, Any]], world: int) -> None:
    results = world2 if world == 2 else world4
    for rank_res in results:
        b = rank_res["bytes"]
        numel = b[0]["numel"]
        padded = -(-numel // world) * world
        # Stage 0: everything; Adam keeps two fp32 states per element. An fp32 model's master is no copy.
        assert b[0]["optimizer_state"] == 8 * padded
        for stage in (0, 1, 2):
            assert b[stage]["master"] == 0 and b[stage]["params"] == 4 * padded
        for stage in (1, 2):
            assert b[stage]["optimizer_state"] == 8 * padded // world
            assert b[stage]["optimizer_state"] <= 8 * numel / world + 8 * world  # ± padding
        # Gradients: stage 0 a full fp32 accumulator; stages 1 (without accumulation) and 2 only the partition.
        assert b[0]["gradients"] == 4 * padded
        assert b[1]["gradients"] == b[2]["gradients"] == 4 * padded // world
        # bf16 model: 2-byte params; stage 2's partition holds bf16 gradients unless grad_accum_dtype=fp32,
        # so its model state is the ZeRO paper's 2Φ + 14Φ/N (+ padding).
        part = padded // world
        assert b[(2, "bf16")]["gradients"] == 2 * part
        assert b[(2, "bf16", "fp32-accum")]["gradients"] == b[(1, "bf16")]["gradients"] == 4 * part
        assert sum(v for k, v in b[(2, "bf16")].items() if k != "numel") == 2 * padded + 14 * part


def test_resume_same_world_size_is_bit_identical(world2: list[dict[Any, Any]]) -> None:
    for rank_res in world2:
        losses, params, steps = rank_res["same_size_resume"]
        straight_losses, straight_params = rank_res["straight"]
        assert steps == 6
        assert losses == straight_losses[3:]
        for k, v in straight_params.items():
            np.testing.assert_array_equal(params[k], v)


def test_resume_world2_stage2_at_world4_stage1(world2: list[dict[Any, Any]], world4: list[dict[Any, Any]]) -> None:
    straight_losses, straight_params = world2[0]["straight"]
    losses, params, steps = world4[0]["resumed"]
    assert steps == 6
    np.testing.assert_allclose(losses, straight_losses[3:], rtol=1e-5)
    for k, v in straight_params.items():
        assert _rel(params[k], v) <= 1e-5, k


def test_resume_world2_stage2_at_world1_stage0(world2: list[dict[Any, Any]]) -> None:
    # World size 1 needs no process group: run in this process.
    shards = [r["shard"] for r in world2]
    losses, params, steps = zc.run_resume(0, 1, 0, shards, 3, 3)
    straight_losses, straight_params = world2[0]["straight"]
    assert steps == 6
    np.testing.assert_allclose(losses, straight_losses[3:], rtol=1e-5)
    for k, v in straight_params.items():
        assert _rel(params[k], v) <= 1e-5, k


@pytest.mark.parametrize("variant", ["reduce+all_gather", "all_reduce+all_reduce", "no_overlap", "one_bucket"])
def test_collective_choices_give_the_same_numbers(world2: list[dict[Any, Any]], variant: str) -> None:
    # Reduce vs all-reduce, all-gather vs broadcast vs all-reduce, overlap or not: same sums, same results.
    # (One bucket instead of several changes nothing either: each element is summed over the same ranks.)
    res = world2[0]
    for stage in (1, 2):
        got, ref = res[("variant", variant, stage)], res[(stage, "fp32", 1)]
        assert got["losses"] == ref["losses"]
        for k, v in ref["params"].items():
            np.testing.assert_array_equal(got["params"][k], v)
