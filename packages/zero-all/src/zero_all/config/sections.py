"""The config sections other packages own, imported in one place.

Each package owns the pydantic model of its section (ARCHITECTURE.md); zero-all only composes
them. While a sibling's model has not landed, a permissive placeholder keeps the key loadable
(``_Pending``): it accepts the section as written and is replaced by the real model, with its
strict key checks, as soon as the sibling package provides it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "PENDING_SECTIONS",
    "ActivationCheckpointingConfig",
    "AioConfig",
    "BF16Config",
    "CSVMonitorConfig",
    "CometConfig",
    "FP16Config",
    "PipelineConfig",
    "TensorBoardConfig",
    "WandbConfig",
    "ZeroConfig",
]

PENDING_SECTIONS: list[str] = []
"""Sections still served by a placeholder (their sibling model is not installed)."""


class _Pending(BaseModel):
    """Placeholder for a section whose owning package has not provided its model yet."""

    model_config = ConfigDict(extra="allow")
    enabled: bool | Literal["auto"] = False


class _PendingZero(BaseModel):
    """Placeholder for ``zero_optimization`` until zero-shard's ZeroConfig is installed."""

    model_config = ConfigDict(extra="allow")
    stage: int = 0


def _pending(section: str, base: type[BaseModel] = _Pending) -> Any:
    PENDING_SECTIONS.append(section)
    return base


try:
    from amp_scaler.config import BF16Config, FP16Config
except ImportError:  # pragma: no cover - until amp-scaler lands
    FP16Config = _pending("fp16")
    BF16Config = _pending("bf16")

try:
    from act_ckpt.config import ActivationCheckpointingConfig
except ImportError:  # pragma: no cover
    ActivationCheckpointingConfig = _pending("activation_checkpointing")

try:
    from zero_shard.config import ZeroConfig
except ImportError:  # pragma: no cover
    ZeroConfig = _pending("zero_optimization", _PendingZero)

try:
    from pipe3d.config import PipelineConfig
except ImportError:  # pragma: no cover
    PipelineConfig = _pending("pipeline")

try:
    from offload_io.config import AioConfig
except ImportError:  # pragma: no cover
    AioConfig = _pending("aio")

try:
    from ds_monitor.config import CometConfig, CSVMonitorConfig, TensorBoardConfig, WandbConfig
except ImportError:  # pragma: no cover
    TensorBoardConfig = _pending("tensorboard")
    CSVMonitorConfig = _pending("csv_monitor")
    WandbConfig = _pending("wandb")
    CometConfig = _pending("comet")
