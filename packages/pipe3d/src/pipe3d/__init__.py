"""pipe3d: pipeline, tensor and data (3D) parallelism.

- :mod:`pipe3d.topology`: ``ProcessTopology``, ``PipeModelDataParallelTopology``, and the process
  groups of each axis (``PipelineParallelGrid``, the ``mpu`` object engines accept).
- :mod:`pipe3d.module`: ``PipelineModule``, ``LayerSpec``, ``TiedLayerSpec``, partitioning.
- :mod:`pipe3d.schedule`: GPipe, 1F1B and interleaved 1F1B as lists of instructions.
- :mod:`pipe3d.p2p`, :mod:`pipe3d.executor`, :mod:`pipe3d.engine`: running them (``PipelineEngine``).
- :mod:`pipe3d.tensor_parallel`: Megatron-style tensor- and sequence-parallel layers.
"""

from pipe3d.engine import PipelineEngine
from pipe3d.executor import inject_grads
from pipe3d.module import LayerSpec, PipelineModule, TiedLayerSpec, partition_balanced, partition_uniform
from pipe3d.schedule import GPipe, InferenceSchedule, Interleaved1F1B, OneFOneB, bubble_formula, make_schedule
from pipe3d.topology import (
    PipeDataParallelTopology,
    PipelineParallelGrid,
    PipeModelDataParallelTopology,
    ProcessTopology,
)

__version__ = "0.1.0"

__all__ = [
    "GPipe",
    "InferenceSchedule",
    "Interleaved1F1B",
    "LayerSpec",
    "OneFOneB",
    "PipeDataParallelTopology",
    "PipeModelDataParallelTopology",
    "PipelineEngine",
    "PipelineModule",
    "PipelineParallelGrid",
    "ProcessTopology",
    "TiedLayerSpec",
    "__version__",
    "bubble_formula",
    "inject_grads",
    "make_schedule",
    "partition_balanced",
    "partition_uniform",
]
