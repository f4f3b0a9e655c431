"""ds-monitor: Training monitors (TensorBoard, CSV, W&B, Comet), timers, throughput, memory stats and plots."""

__version__ = "0.1.0"

__all__ = ["__version__"]
