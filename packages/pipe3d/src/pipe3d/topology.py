"""Process topology: ranks laid out on named axes (pipe × data × model) and one process group per axis slice.

A :class:`ProcessTopology` is pure arithmetic (no torch.distributed): rank ``r`` sits at the
coordinate whose row-major index over ``axes`` is ``r``, the *last* axis varying fastest. With
DeepSpeed's :class:`PipeModelDataParallelTopology` the axes are ``("pipe", "data", "model")``, so
tensor-parallel ranks (which exchange the most data) are neighbours, then data-parallel replicas,
then pipeline stages.

:class:`PipelineParallelGrid` builds the process groups from a topology; it is the ``mpu`` object
DeepSpeed's engine accepts (``get_data_parallel_group()`` etc.), and zero-all hands its
data-parallel group to ZeRO so gradients are reduced over the data axis only.
"""

from __future__ import annotations

import itertools
from collections import namedtuple
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

__all__ = [
    "PipeDataParallelTopology",
    "PipeModelDataParallelTopology",
    "PipelineParallelGrid",
    "ProcessTopology",
]


class ProcessTopology:
    """Ranks on a Cartesian grid of named axes (DeepSpeed's ``ProcessTopology``).

    ``ProcessTopology(axes=["pipe", "data"], dims=[2, 4])`` is 8 ranks; rank ``r`` has coordinate
    ``get_coord(r)`` (a namedtuple with one field per axis) and ``get_rank(pipe=1, data=2) == 6``.
    """

    def __init__(self, axes: Sequence[str], dims: Sequence[int]) -> None:
        axes, dims = list(axes), [int(d) for d in dims]
        if len(axes) != len(dims):
            raise ValueError(f"ProcessTopology: {len(axes)} axes {axes} but {len(dims)} dims {dims}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"ProcessTopology: axis names must be unique, got {axes}")
        if any(d < 1 for d in dims):
            raise ValueError(f"ProcessTopology: every dim must be >= 1, got {dims}")
        self.axes = axes
        self.dims = dims
        self.ProcessCoord = namedtuple("ProcessCoord", axes)  # type: ignore[misc]
        # Row-major enumeration: itertools.product varies the last axis fastest.
        self._coords = [self.ProcessCoord(*c) for c in itertools.product(*(range(d) for d in dims))]
        self._rank_of = {c: r for r, c in enumerate(self._coords)}

    def world_size(self) -> int:
        """The number of ranks (the product of the dims)."""
        return len(self._coords)

    def get_axis_names(self) -> list[str]:
        """The axis names, outermost first."""
        return list(self.axes)

    def get_dim(self, axis: str) -> int:
        """The size of ``axis`` (0 when the topology has no such axis, as DeepSpeed returns)."""
        return self.dims[self.axes.index(axis)] if axis in self.axes else 0

    def get_rank(self, **coord: int) -> int:
        """The rank at a full coordinate, e.g. ``get_rank(pipe=1, data=0, model=1)``."""
        if set(coord) != set(self.axes):
            raise ValueError(f"get_rank needs a value for every axis {self.axes}, got {sorted(coord)}")
        key = self.ProcessCoord(**coord)
        if key not in self._rank_of:
            raise ValueError(
                f"get_rank: coordinate {dict(coord)} is outside dims {dict(zip(self.axes, self.dims, strict=False))}"
            )
        return self._rank_of[key]

    def get_coord(self, rank: int) -> Any:
        """The coordinate (namedtuple ``ProcessCoord``) of ``rank``."""
        if not 0 <= rank < len(self._coords):
            raise ValueError(f"get_coord: rank {rank} is outside a topology of {len(self._coords)} ranks")
        return self._coords[rank]

    def get_rank_repr(
        self, rank: int, omit_axes: Sequence[str] = ("data", "pipe"), inner_sep: str = "_", outer_sep: str = "-"
    ) -> str:
        """A name for ``rank`` from the axes not omitted, e.g. ``"model_01"`` (DeepSpeed's checkpoint naming)."""
        coord = self.get_coord(rank)
        parts = [f"{a}{inner_sep}{getattr(coord, a):02d}" for a in self.axes if a not in omit_axes]
        return outer_sep.join(parts)

    def filter_match(self, **filters: int) -> list[int]:
        """The ranks whose coordinate matches every ``axis=value`` given, in rank order."""
        unknown = set(filters) - set(self.axes)
        if unknown:
            raise ValueError(f"filter_match: unknown axes {sorted(unknown)}; axes are {self.axes}")
        return [r for r, c in enumerate(self._coords) if all(getattr(c, a) == v for a, v in filters.items())]

    def get_axis_list(self, axis: str, idx: int) -> list[int]:
        """The ranks whose coordinate on ``axis`` is ``idx``."""
        return self.filter_match(**{axis: idx})

    def get_axis_comm_lists(self, axis: str) -> list[list[int]]:
        """One rank list per slice along ``axis``: the ranks that differ only in ``axis``.

        These are the groups that communicate along that axis (e.g. ``"data"``: the ranks that
        all-reduce gradients together). Empty when the topology has no such axis.
        """
        if axis not in self.axes:
            return []
        others = [a for a in self.axes if a != axis]
        lists = []
        for fixed in itertools.product(*(range(self.get_dim(a)) for a in others)):
            where = dict(zip(others, fixed, strict=True))
            lists.append([self.get_rank(**where, **{axis: i}) for i in range(self.get_dim(axis))])
        return lists

    def __str__(self) -> str:
        return f"ProcessTopology({dict(zip(self.axes, self.dims, strict=True))})"

    __repr__ = __str__


class PipeDataParallelTopology(ProcessTopology):
    """Axes ``("pipe", "data")``: pipeline stages of data-parallel replicas."""

    def __init__(self, num_pp: int, num_dp: int) -> None:
        super().__init__(axes=["pipe", "data"], dims=[num_pp, num_dp])


class PipeModelDataParallelTopology(ProcessTopology):
    """Axes ``("pipe", "data", "model")``: 3D parallelism (model = tensor parallel, fastest-varying)."""

    def __init__(self, num_pp: int, num_mp: int, num_dp: int) -> None:
        super().__init__(axes=["pipe", "data", "model"], dims=[num_pp, num_dp, num_mp])


def _groups_for(lists: list[list[int]], rank: int, what: str) -> tuple[Any, list[int]]:
    """Create one process group per rank list (every rank must call this alike); return ours."""
    mine: tuple[Any, list[int]] | None = None
    for ranks in lists:
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            mine = (group, ranks)
    if mine is None:
        raise RuntimeError(f"rank {rank} is in no {what} group of the topology")
    return mine


class PipelineParallelGrid:
    """Process groups of a topology: the ``mpu`` object (DeepSpeed's ``PipelineParallelGrid``).

    Builds, collectively on every rank (so call it on all ranks, in the same order), a group per
    slice of each axis: pipe, data, model (tensor parallel), and DeepSpeed's "model parallel"
    group (pipe × model: all ranks of one data-parallel replica, used for overflow and gradient
    norm checks). ``topology=None`` means all ranks are one pipeline of ``world_size`` stages.

    Naming follows DeepSpeed: ``get_model_parallel_*`` is the pipe × model slice,
    ``get_slice_parallel_*`` / ``get_tensor_model_parallel_*`` the tensor-parallel (``model``)
    axis alone, ``get_pipe_parallel_*`` the pipeline axis, ``get_data_parallel_*`` the data axis.
    """

    def __init__(self, topology: ProcessTopology | None = None, process_group: Any = None) -> None:
        if process_group is not None:
            raise NotImplementedError("PipelineParallelGrid over a sub-group of the world is not supported")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("PipelineParallelGrid needs torch.distributed to be initialized first")
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if topology is None:
            topology = PipeDataParallelTopology(num_pp=self.world_size, num_dp=1)
        if topology.world_size() != self.world_size:
            raise ValueError(
                f"topology {topology} has {topology.world_size()} ranks but the world has {self.world_size}; "
                "the product of the parallel sizes must equal the world size"
            )
        self._topo = topology
        self.pipe_parallel_size = max(topology.get_dim("pipe"), 1)
        self.data_parallel_size = max(topology.get_dim("data"), 1)
        self.model_parallel_size = max(topology.get_dim("model"), 1)
        self.slice_parallel_size = self.model_parallel_size
        coord = topology.get_coord(self.global_rank)
        self.stage_id = getattr(coord, "pipe", 0)
        self.data_parallel_id = getattr(coord, "data", 0)
        self.is_first_stage = self.stage_id == 0
        self.is_last_stage = self.stage_id == self.pipe_parallel_size - 1

        r = self.global_rank
        single = [[x] for x in range(self.world_size)]
        self.dp_proc_group, self.dp_group = _groups_for(topology.get_axis_comm_lists("data") or single, r, "data")
        pipe_lists = topology.get_axis_comm_lists("pipe") or single
        self.pp_proc_group, self.pp_group = _groups_for(pipe_lists, r, "pipe")
        # Point-to-point traffic gets its own communicators, one for activations and one for
        # gradients: NCCL matches sends and receives per communicator in FIFO order, and the two
        # kinds of message flow in an order that only each kind on its own keeps (see schedule.py).
        self.p2p_activation_group, _ = _groups_for(pipe_lists, r, "pipe")
        self.p2p_grad_group, _ = _groups_for(pipe_lists, r, "pipe")
        self.slice_proc_group, self.slice_group = _groups_for(
            topology.get_axis_comm_lists("model") or single, r, "model"
        )
        # DeepSpeed's "model parallel" group: one data-parallel replica (all pipe × model ranks).
        replicas = [sorted(topology.get_axis_list("data", d)) for d in range(self.data_parallel_size)]
        if "data" not in topology.get_axis_names():
            replicas = [list(range(self.world_size))]
        self.ds_model_proc_group, self.ds_model_group = _groups_for(replicas, r, "model-parallel")
        self.ds_model_world_size = len(self.ds_model_group)
        self.ds_model_rank = self.ds_model_group.index(r)

    # ---- the topology -----------------------------------------------------------------------------
    def topology(self) -> ProcessTopology:
        """The topology the groups were built from."""
        return self._topo

    def get_global_rank(self) -> int:
        """This process's rank in the world."""
        return self.global_rank

    def get_stage_id(self) -> int:
        """This rank's pipeline stage."""
        return self.stage_id

    def get_data_parallel_id(self) -> int:
        """This rank's data-parallel replica index."""
        return self.data_parallel_id

    def stage_to_global(self, stage_id: int, **kwargs: int) -> int:
        """The global rank of stage ``stage_id`` with this rank's other coordinates (overridable by kwargs)."""
        me = self._topo.get_coord(self.global_rank)._asdict()
        me.update(pipe=stage_id, **kwargs)
        return self._topo.get_rank(**me)

    # ---- pipe axis ------------------------------------------------------------------------------------
    def get_pipe_parallel_rank(self) -> int:
        """This rank's stage (its index in the pipe group)."""
        return self.stage_id

    def get_pipe_parallel_world_size(self) -> int:
        """The number of pipeline stages."""
        return self.pipe_parallel_size

    def get_pipe_parallel_group(self) -> Any:
        """The process group of this rank's pipeline (one rank per stage)."""
        return self.pp_proc_group

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group

    # ---- data axis -----------------------------------------------------------------------------------
    def get_data_parallel_rank(self) -> int:
        """This rank's index among the data-parallel replicas."""
        return self.data_parallel_id

    def get_data_parallel_world_size(self) -> int:
        """The number of data-parallel replicas."""
        return self.data_parallel_size

    def get_data_parallel_group(self) -> Any:
        """The group gradients are averaged over (and ZeRO partitions over)."""
        return self.dp_proc_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        """The global ranks of this rank's data-parallel group."""
        return list(self.dp_group)

    # ---- model-parallel (pipe × model) slice: DeepSpeed's meaning -------------------------------------
    def get_model_parallel_rank(self) -> int:
        """This rank's index in its replica (pipe × model ranks)."""
        return self.ds_model_rank

    def get_model_parallel_world_size(self) -> int:
        """Ranks per data-parallel replica (pipe × model)."""
        return self.ds_model_world_size

    def get_model_parallel_group(self) -> Any:
        """The group of one data-parallel replica (pipe × model ranks)."""
        return self.ds_model_proc_group

    # ---- tensor-parallel (model axis) -----------------------------------------------------------------
    def get_slice_parallel_rank(self) -> int:
        """This rank's tensor-parallel index (the ``model`` coordinate)."""
        return getattr(self._topo.get_coord(self.global_rank), "model", 0)

    def get_slice_parallel_world_size(self) -> int:
        """The tensor-parallel degree."""
        return self.slice_parallel_size

    def get_slice_parallel_group(self) -> Any:
        """The tensor-parallel group."""
        return self.slice_proc_group

    get_tensor_model_parallel_rank = get_slice_parallel_rank
    get_tensor_model_parallel_world_size = get_slice_parallel_world_size
    get_tensor_model_parallel_group = get_slice_parallel_group

    def __repr__(self) -> str:
        return (
            f"PipelineParallelGrid(rank={self.global_rank}, {self._topo}, stage={self.stage_id}, "
            f"data={self.data_parallel_id}, model={self.get_slice_parallel_rank()})"
        )
