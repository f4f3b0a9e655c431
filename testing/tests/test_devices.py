"""The device marks and fixture: cpu always runs, cuda runs or is skipped with the reason."""

from __future__ import annotations

import os

import pytest
import torch

from zero_testkit import cuda_skip_reason, device_params, gpu_count, requires_gpus, run_distributed


def test_device_fixture_gives_a_usable_device(device: torch.device) -> None:
    x = torch.arange(4.0, device=device)
    assert x.device.type == device.type
    assert float(x.sum()) == 6.0


def test_params_are_cpu_and_a_marked_cuda() -> None:
    cpu, cuda = device_params()
    assert (cpu.id, cuda.id) == ("cpu", "cuda")
    names = [m.name for m in cuda.marks]
    assert names == ["cuda", "skipif"]
    skip = cuda.marks[1]
    assert skip.args == (cuda_skip_reason() is not None,)
    if cuda_skip_reason() is not None:
        # The reason says what is missing, in words a reader of the skip summary understands.
        assert "needs a CUDA device" in skip.kwargs["reason"]
    assert [p.id for p in device_params(cpu=False)] == ["cuda"]


def test_requires_gpus_counts_devices() -> None:
    @requires_gpus(gpu_count() + 1)
    def never() -> None: ...

    marks = {m.name: m for m in never.pytestmark}
    assert "cuda" in marks and marks["skipif"].args == (True,)


def test_untagged_tests_are_pinned_to_the_cpu() -> None:
    # The plugin's default, so that zero-all's get_device() keeps CPU-written tests on the CPU.
    assert os.environ.get("DS_ACCELERATOR")


def _read_env(rank: int, world_size: int) -> str:
    return os.environ["ZERO_TESTKIT_PROBE"] + str(rank)


def test_run_distributed_passes_env() -> None:
    assert run_distributed(_read_env, 2, env={"ZERO_TESTKIT_PROBE": "r"}, timeout=60) == ["r0", "r1"]


def _nccl_all_reduce(rank: int, world_size: int) -> list[float]:
    import torch.distributed as dist

    assert torch.cuda.current_device() == rank
    t = torch.tensor([float(rank + 1)], device="cuda")
    dist.all_reduce(t)
    return t.tolist()


@requires_gpus(2)
@pytest.mark.multi_gpu
def test_nccl_binds_one_gpu_per_rank() -> None:
    assert run_distributed(_nccl_all_reduce, 2, backend="nccl", timeout=120) == [[3.0], [3.0]]
