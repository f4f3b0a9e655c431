"""Config sections for offloading: ``offload_optimizer``, ``offload_param`` (inside ``zero_optimization``) and ``aio``.

Key names, defaults and bounds follow DeepSpeed (``deepspeed/runtime/zero/offload_config.py`` and
``deepspeed/runtime/swap_tensor/aio_config.py``), so an existing ``ds_config.json`` validates unchanged.
Unknown keys are errors (``extra="forbid"``); numbers written as ``1e8`` in JSON arrive as floats and are
accepted for integer keys when they are whole numbers.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["AioConfig", "OffloadDevice", "OffloadOptimizerConfig", "OffloadParamConfig"]

# A non-negative element/byte count. pydantic's lax int accepts 1e8 (a float with no fraction) and refuses 1.5.
NonNegInt = Annotated[int, Field(ge=0)]


class OffloadDevice(str, Enum):
    """Where offloaded tensors live: ``none`` (not offloaded), ``cpu`` memory or an ``nvme`` path."""

    none = "none"
    cpu = "cpu"
    nvme = "nvme"


class _Section(BaseModel):
    """Common settings: unknown keys are errors, assignment is validated, enums compare as their values."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class _NvmeCheck(_Section):
    device: OffloadDevice = OffloadDevice.none
    nvme_path: Path | None = None

    @model_validator(mode="after")
    def _nvme_needs_path(self) -> _NvmeCheck:
        # DeepSpeed only fails later, deep inside the swapper; say it at config time with the key name.
        if self.device == OffloadDevice.nvme and self.nvme_path is None:
            raise ValueError("device='nvme' needs nvme_path (a directory on the NVMe drive to swap to)")
        return self

    @property
    def enabled(self) -> bool:
        """True when ``device`` is ``cpu`` or ``nvme``."""
        return self.device != OffloadDevice.none


class OffloadParamConfig(_NvmeCheck):
    """``zero_optimization.offload_param``: move ZeRO stage-3 parameters to CPU or NVMe (valid with stage 3 only)."""

    device: OffloadDevice = OffloadDevice.none
    """Where parameters go: ``none``, ``cpu`` or ``nvme``."""
    nvme_path: Path | None = None
    """Directory on the NVMe drive for swapped parameters (required with ``device='nvme'``)."""
    buffer_count: NonNegInt = 5
    """Number of buffers in the pool used to swap parameters to/from NVMe."""
    buffer_size: NonNegInt = 100_000_000
    """Elements per swap buffer."""
    max_in_cpu: NonNegInt = 1_000_000_000
    """Parameter elements kept in CPU memory when offloading to NVMe."""
    pin_memory: bool = False
    """Use page-locked CPU memory (faster host-device copies, more pinned memory)."""


class OffloadOptimizerConfig(_NvmeCheck):
    """``zero_optimization.offload_optimizer``: keep optimizer states on CPU/NVMe and step on CPU (stages 1, 2, 3)."""

    device: OffloadDevice = OffloadDevice.none
    """Where optimizer states go: ``none``, ``cpu`` or ``nvme``. The optimizer step runs on CPU either way."""
    nvme_path: Path | None = None
    """Directory on the NVMe drive for swapped optimizer states (required with ``device='nvme'``)."""
    buffer_count: NonNegInt = 4
    """Buffers in the NVMe swap pool; at least the number of states per parameter (Adam: 4)."""
    pin_memory: bool = False
    """Use page-locked CPU memory."""
    pipeline_read: bool = False
    """Overlap reading the next tile from NVMe with the step on the current one (ZeRO-Infinity)."""
    pipeline_write: bool = False
    """Overlap writing the previous tile to NVMe with the step on the current one."""
    fast_init: bool = False
    """Faster optimizer initialization when offloading to NVMe."""
    ratio: float = Field(1.0, ge=0.0, le=1.0)
    """Fraction of optimizer states offloaded to CPU (partial offload needs ZeRO stage 3)."""
    super_offload: bool = False
    """DeepSpeed's SuperOffload for superchips (ZeRO stage 3 only)."""
    convert_grad_on_cpu: bool = True
    """Convert gradients to fp32 on CPU rather than on the accelerator."""
    cpuadam_cores_perc: float = Field(0.8, ge=0.0, le=1.0)
    """Fraction of CPU cores used by CPU Adam with ``super_offload``."""

    @property
    def pipeline(self) -> bool:
        """True when either NVMe pipelining direction is on (DeepSpeed's derived ``pipeline`` flag)."""
        return self.pipeline_read or self.pipeline_write


class AioConfig(_Section):
    """Top-level ``aio`` section: the asynchronous file IO engine used for NVMe offload."""

    block_size: Annotated[int, Field(gt=0)] = 8_388_608
    """Bytes per IO request. Ours defaults to 8 MiB where DeepSpeed's is 1 MiB: measured 20-25% faster for
    the large sequential requests of offload (docs/aio.md); a config that sets 1048576 gets 1 MiB."""
    queue_depth: Annotated[int, Field(gt=0)] = 8
    """IO requests in flight per thread."""
    intra_op_parallelism: Annotated[int, Field(gt=0)] = Field(1, alias="thread_count")
    """IO threads per operation (older DeepSpeed versions call it ``thread_count``; both names are accepted)."""
    single_submit: bool = False
    """Submit requests one at a time rather than as a batch."""
    overlap_events: bool = True
    """Overlap request submission with completion polling."""
    use_gds: bool = False
    """Use NVIDIA GPUDirect Storage (not built here; accepted for config compatibility)."""
