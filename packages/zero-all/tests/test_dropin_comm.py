"""zero_all.comm, init_distributed and zero_all.accelerator against torch.distributed / DeepSpeed semantics."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from dropin_cases import comm_collectives, init_from_env, init_from_mpi_env

from zero_all import accelerator as acc
from zero_testkit import free_port, run_distributed

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_distributed(comm_collectives, 2, timeout=240)


def test_collectives_match_their_definitions(two_ranks: list[dict]) -> None:
    r0, r1 = two_ranks
    x = [np.array([1.0, 10.0]), np.array([2.0, 20.0])]  # each rank's input
    for r, out in enumerate((r0, r1)):
        assert (out["rank"], out["world"], out["local"]) == (r, 2, r)
        np.testing.assert_array_equal(out["sum"], x[0] + x[1])
        np.testing.assert_array_equal(out["avg"], (x[0] + x[1]) / 2)
        np.testing.assert_array_equal(out["avg_async"], (x[0] + x[1]) / 2)
        np.testing.assert_array_equal(out["max"], np.maximum(x[0], x[1]))
        np.testing.assert_array_equal(out["inference"], x[0] + x[1])
        assert out["inference_is_same"]
        np.testing.assert_array_equal(out["coalesced"][0], x[0] + x[1])
        np.testing.assert_array_equal(out["coalesced"][1], [9.0])  # 3 * (1 + 2)
        np.testing.assert_array_equal(out["all_gather"], [x[0], x[1]])
        np.testing.assert_array_equal(out["all_gather_into_tensor"], np.concatenate(x))
        np.testing.assert_array_equal(out["allgather_fn"], np.concatenate(x))
        # big = arange(4) + 100 r; the sum is 2 * arange(4) + 100; rank r keeps elements [2r, 2r + 2).
        total = 2 * np.arange(4.0) + 100
        np.testing.assert_array_equal(out["reduce_scatter_tensor"], total[2 * r : 2 * r + 2])
        np.testing.assert_array_equal(out["reduce_scatter_avg"], total[2 * r : 2 * r + 2] / 2)
        np.testing.assert_array_equal(out["reduce_scatter"], total[2 * r : 2 * r + 2])
        np.testing.assert_array_equal(out["broadcast"], x[1])
        assert out["objects"] == [{"r": 0}, {"r": 1}]
        assert out["world_ranks"] == [0, 1]
    np.testing.assert_array_equal(r0["reduce_on_dst"], x[0] + x[1])
    assert r1["recv"] == [42.0]
    assert r1["group_ranks"] == [1] and r1["global_of_group_rank0"] == 1


def test_gradient_allreduce_op_and_optimizer_state_dict(two_ranks: list[dict]) -> None:
    """SGD(lr=1)'s update is the combined gradient (ranks give 1 and 2: mean 1.5, sum 3); a rank's
    ZeroShardedOptimizer.state_dict() at stage 2 resumes bit for bit."""
    for out in two_ranks:
        np.testing.assert_allclose(out["allreduce_op"]["mean"], np.full((2, 3), 1.5), rtol=1e-6)
        np.testing.assert_allclose(out["allreduce_op"]["SUM"], np.full((2, 3), 3.0), rtol=1e-6)
        assert out["state_dict_max_diff"] == 0.0


def test_init_distributed_from_launcher_env() -> None:
    results = run_distributed(init_from_env, 2, init_process_group=False, timeout=180)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 1.0 and r["backend"] == "gloo" for r in results)


def test_init_distributed_discovers_mpi() -> None:
    port = free_port()
    results = run_distributed(init_from_mpi_env, 2, port, init_process_group=False, timeout=180)
    for r, out in enumerate(results):
        assert out["env"] == [str(r), "2", str(r), str(port)]
        assert out["sum"] == 2.0 and out["local_rank"] == r


def test_init_distributed_arguments_in_a_fresh_process() -> None:
    """Before a group: comm ops name themselves; dist_init_required=False needs a group (DeepSpeed asserts);
    init_method/rank/world_size reach torch."""
    port = free_port()
    code = f"""
        import os, datetime
        import torch.distributed as dist
        import zero_all
        import torch
        import zero_all.comm as c
        for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
            os.environ.pop(k, None)
        assert not c.is_initialized() and c.is_available()
        try:
            c.all_reduce(torch.ones(1))
        except RuntimeError as e:
            print("ERR0", e)
        try:
            zero_all.init_distributed(dist_init_required=False)
        except RuntimeError as e:
            print("ERR1", e)
        try:
            zero_all.init_distributed(timeout=5)
        except TypeError as e:
            print("ERR2", e)
        try:
            zero_all.init_distributed(world_size=2)
        except RuntimeError as e:
            print("ERR3", e)
        zero_all.init_distributed(init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                  timeout=datetime.timedelta(seconds=30), verbose=False)
        print("OK", dist.get_world_size(), dist.get_backend(), dist.is_initialized())
        zero_all.init_distributed(dist_init_required=False)  # now fine: a group exists
        print("OK2")
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert "ERR0 zero_all.comm.all_reduce: torch.distributed is not initialized" in out.stdout, out.stderr
    assert "ERR1 init_distributed: dist_init_required=False but torch.distributed is not initialized" in out.stdout, (
        out.stderr
    )
    assert "ERR2 init_distributed: timeout must be a datetime.timedelta" in out.stdout
    assert "ERR3 init_distributed: world_size=2 but no launcher environment" in out.stdout
    assert "OK 1 gloo True" in out.stdout and "OK2" in out.stdout, out.stderr


# ---------------------------------------------------------------- accelerator


def test_cpu_accelerator_matches_deepspeeds_cpu_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    a = acc.CPUAccelerator()
    assert a.device_name() == a.device_name(3) == a.current_device_name() == "cpu"
    assert a.device(0) == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert a.current_device() == 3
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert a.device_count() == 4
    monkeypatch.delenv("LOCAL_SIZE")
    assert a.device_count() >= 1
    assert a.is_available() and a.is_synchronized_device() and a.communication_backend_name() == "gloo"
    assert a.is_bf16_supported() and torch.bfloat16 in a.supported_dtypes()
    assert a.Stream is None and a.Event is None and a.current_stream() is None
    with a.stream(None):
        pass
    t = torch.ones(3)
    assert a.pin_memory(t) is t and a.on_accelerator(t)
    a.synchronize()
    a.empty_cache()


def test_cpu_accelerator_memory_is_this_processs_rss() -> None:
    a = acc.CPUAccelerator()
    a.reset_peak_memory_stats()
    before = a.memory_allocated()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so the pages are resident
    during = a.memory_allocated()
    assert during - before > 48 * 2**20
    del block
    assert a.max_memory_allocated() >= during
    stats = a.memory_stats()
    assert stats["allocated_bytes.all.peak"] >= stats["allocated_bytes.all.current"] > 0
    assert a.total_memory() > a.available_memory() > 0


def test_accelerator_rng_matches_torch() -> None:
    a = acc.CPUAccelerator()
    a.manual_seed(123)
    first = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(first, torch.rand(4))
    state = a.get_rng_state()
    x = torch.rand(3)
    a.set_rng_state(state)
    assert torch.equal(x, torch.rand(3))
    a.manual_seed_all(7)
    assert a.initial_seed() == 7 and a.random() is torch.random


def test_get_accelerator_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acc, "_ACCELERATOR", None)
    chosen = acc.get_accelerator()
    current = torch.accelerator.current_accelerator(check_available=True)
    assert chosen.device_name() == (current.type if current is not None else "cpu")
    assert acc.get_accelerator() is chosen  # one object per process
    monkeypatch.setattr(acc, "_ACCELERATOR", None)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert isinstance(acc.get_accelerator(), acc.CPUAccelerator)
    monkeypatch.setattr(acc, "_ACCELERATOR", None)
    monkeypatch.setenv("DS_ACCELERATOR", "tpu")
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR='tpu'"):
        acc.get_accelerator()


def test_device_accelerator_names_without_a_device() -> None:
    cuda = acc.DeviceAccelerator("cuda")
    assert cuda.device_name() == "cuda" and cuda.device_name(2) == "cuda:2"
    assert cuda.device(1) == torch.device("cuda", 1)
    assert cuda.communication_backend_name() == "nccl" and cuda.export_envs() == ["NCCL"]
    assert cuda.Stream is torch.cuda.Stream and cuda.Event is torch.cuda.Event
    assert not cuda.on_accelerator(torch.ones(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_accelerator_queries() -> None:
    a = acc.DeviceAccelerator("cuda")
    assert a.current_device_name() == f"cuda:{torch.cuda.current_device()}"
    assert a.device_count() == torch.cuda.device_count()
    a.reset_peak_memory_stats()
    x = torch.ones(2**20, device="cuda")
    assert a.memory_allocated() >= x.numel() * 4 and a.max_memory_allocated() >= a.memory_allocated()
    assert a.total_memory() == torch.cuda.get_device_properties(0).total_memory
    assert a.is_bf16_supported() == torch.cuda.is_bf16_supported()
    a.manual_seed(5)
    first = torch.rand(3, device="cuda")
    torch.cuda.manual_seed(5)
    assert torch.equal(first, torch.rand(3, device="cuda"))
    s = a.Stream()
    with a.stream(s):
        y = x * 2
    a.synchronize()
    assert a.on_accelerator(y) and a.pin_memory(torch.ones(2)).is_pinned()
