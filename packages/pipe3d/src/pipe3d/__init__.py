"""pipe3d: Pipeline, tensor and data (3D) parallelism: topology, PipelineModule, schedules, tensor-parallel layers."""

__version__ = "0.1.0"

__all__ = ["__version__"]
