"""Topology arithmetic, process groups on 4 real ranks, partitioning, bad input."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from pipe3d import (
    LayerSpec,
    PipeDataParallelTopology,
    PipelineModule,
    PipelineParallelGrid,
    PipeModelDataParallelTopology,
    ProcessTopology,
    partition_balanced,
    partition_uniform,
)
from pipe3d.models import gpt_specs, loss_fn
from zero_testkit import run_distributed


def test_ranks_and_coordinates_are_row_major() -> None:
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    assert topo.get_axis_names() == ["pipe", "data", "model"]
    assert topo.world_size() == 8
    assert topo.get_rank(pipe=1, data=0, model=1) == 5
    c = topo.get_coord(6)
    assert (c.pipe, c.data, c.model) == (1, 1, 0)
    assert topo.get_axis_comm_lists("model") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.get_axis_comm_lists("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.get_axis_comm_lists("pipe") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.filter_match(pipe=0, model=1) == [1, 3]
    assert topo.get_rank_repr(5) == "model_01"
    assert topo.get_dim("tensor") == 0 and topo.get_axis_comm_lists("tensor") == []
    for r in range(8):
        assert topo.get_rank(**topo.get_coord(r)._asdict()) == r


def test_topology_bad_input() -> None:
    with pytest.raises(ValueError, match="2 axes"):
        ProcessTopology(["pipe", "data"], [2])
    with pytest.raises(ValueError, match="unique"):
        ProcessTopology(["pipe", "pipe"], [2, 2])
    with pytest.raises(ValueError, match="outside"):
        PipeDataParallelTopology(2, 2).get_rank(pipe=2, data=0)
    with pytest.raises(ValueError, match="every axis"):
        PipeDataParallelTopology(2, 2).get_rank(pipe=1)


def test_partitions() -> None:
    assert partition_uniform(7, 3) == [0, 3, 5, 7]
    assert partition_balanced([0, 1, 1, 1, 1, 0], 2) == [0, 3, 6]
    assert partition_balanced([10, 1, 1, 1, 1, 10], 2) == [0, 3, 6]
    rng = random.Random(0)
    for _ in range(200):
        n, k = rng.randint(1, 12), rng.randint(1, 5)
        if n < k:
            continue
        w = [rng.choice([0, 1, 5, 100]) for _ in range(n)]
        b = partition_balanced(w, k)
        assert b[0] == 0 and b[-1] == n and all(b[i] < b[i + 1] for i in range(k)), (w, k, b)
        worst = max(sum(w[b[i] : b[i + 1]]) for i in range(k))
        # Brute force over every split: nothing does better.
        import itertools

        best = min(
            max(sum(w[c[i] : c[i + 1]]) for i in range(k))
            for cut in itertools.combinations(range(1, n), k - 1)
            for c in [(0, *cut, n)]
        )
        assert worst == best, (w, k, b)


def test_partition_methods_single_process() -> None:
    specs = gpt_specs(blocks=4)
    m = PipelineModule(specs, num_stages=1, loss_fn=loss_fn)
    assert m.parts == [0, len(specs)] and m.layer_to_stage() == dict.fromkeys(range(len(specs)), 0)
    with pytest.raises(ValueError, match="matches no layer"):
        PipelineModule(specs, num_stages=1, partition_method="type:Conv")
    with pytest.raises(ValueError, match="accepted: 'parameters', 'uniform', 'type:REGEX'"):
        PipelineModule(specs, num_stages=1, partition_method="profile")
    with pytest.raises(ValueError, match="num_stages= or topology="):
        PipelineModule(specs)
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        LayerSpec(len)


def _grid_and_partitions(rank: int, world: int) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=1, num_dp=2)
    grid = PipelineParallelGrid(topo)
    assert grid.get_stage_id() == rank // 2 and grid.get_data_parallel_rank() == rank % 2
    assert grid.get_data_parallel_group_ranks() == [rank - rank % 2, rank - rank % 2 + 1]
    assert grid.get_model_parallel_world_size() == 2  # pipe x model: one data-parallel replica
    assert grid.get_tensor_model_parallel_world_size() == 1
    assert grid.stage_to_global(1) == 2 + rank % 2
    # The data group really sums over the data axis only.
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=grid.get_data_parallel_group())
    assert t.item() == (0 + 1 if rank < 2 else 2 + 3)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=grid.get_pipe_parallel_group())
    assert t.item() == (0 + 2 if rank % 2 == 0 else 1 + 3)

    specs = gpt_specs(blocks=4)  # embed, 4 blocks, norm, head
    for method, expect in [("uniform", [0, 4, 7]), ("type:block", [0, 3, 7]), ("parameters", [0, 3, 7])]:
        m = PipelineModule(specs, topology=topo, loss_fn=loss_fn, partition_method=method)
        assert m.parts == expect, (method, m.parts)
        built = {int(n.split(".")[0]) for n, _ in m.named_parameters() if n[0].isdigit()}
        assert built <= set(range(m.parts[m.stage_id], m.parts[m.stage_id + 1])), (method, built)

    with pytest.raises(ValueError, match="does not divide the world size 4"):
        PipelineModule(specs, num_stages=3)
    with pytest.raises(ValueError, match="cannot fill 4 stages"):
        PipelineModule(specs[:3], num_stages=4)
    with pytest.raises(ValueError, match="has 8 ranks but the world has 4"):
        PipelineParallelGrid(PipeModelDataParallelTopology(2, 2, 2))


def test_grid_groups_and_partitions_on_4_ranks() -> None:
    run_distributed(_grid_and_partitions, 4, timeout=120)
