"""The ``"optimizer"`` section: DeepSpeed's type names mapped to optimizer factories.

Semantics that must match DeepSpeed (DEEPSPEED_NOTES.md): ``"Adam"`` means AdamW (decoupled
weight decay) unless ``"adam_w_mode": false``; ``"AdamW"`` is the same; ``"torch_adam": true``
selects torch's implementation. ``"OneBitAdam"``, ``"ZeroOneAdam"`` and ``"OneBitLamb"`` are
onebit-comm's, with DeepSpeed's parameter names; they communicate their own (1-bit) momentum, so
they run at ZeRO stage 0 only (:func:`check_optimizer_stage`). Type names are case-insensitive for DeepSpeed's own
optimizers; any other name is looked up in ``torch.optim`` by its exact spelling (``"SGD"``,
``"RMSprop"``), as DeepSpeed does.

The engine never constructs the optimizer over the model directly: zero-shard calls the
factory on the fp32 partitions it owns (ZeroShardedOptimizer's ``optimizer_factory``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from zero_all.config.known_keys import suggest
from zero_all.config.loader import ConfigError

__all__ = [
    "ADAM_PARAMS",
    "NOT_IMPLEMENTED_OPTIMIZERS",
    "ONEBIT_OPTIMIZERS",
    "OptimizerFactory",
    "check_optimizer",
    "check_optimizer_layout",
    "check_optimizer_stage",
    "optimizer_factory",
]

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]

# DeepSpeed's own optimizer names (lower-case, as it compares them).
_ADAM_NAMES = {"adam", "adamw"}
_TORCH_LOWER = {"adagrad": "Adagrad"}
# onebit-comm's optimizers: they communicate (compressed) themselves, so ZeRO stage 0 only.
ONEBIT_OPTIMIZERS = {"onebitadam": "OneBitAdam", "zerooneadam": "ZeroOneAdam", "onebitlamb": "OneBitLamb"}
NOT_IMPLEMENTED_OPTIMIZERS: dict[str, str] = {
    "lamb": "Lamb",
    "lion": "Lion",
    "muadam": "MuAdam",
    "muadamw": "MuAdamW",
    "musgd": "MuSGD",
    "muon": "Muon",
}
ADAM_PARAMS = {"lr", "betas", "eps", "weight_decay", "bias_correction", "adam_w_mode", "torch_adam", "amsgrad"}
_ADAM_IGNORED = {"set_grad_none", "fused"}  # accepted by DeepSpeed's FusedAdam; no effect here


def _torch_optimizer_names() -> list[str]:
    return sorted(
        n
        for n, c in vars(torch.optim).items()
        if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
    )


def accepted_types() -> str:
    """The list shown in errors."""
    return (
        "Adam, AdamW, Adagrad, OneBitAdam, ZeroOneAdam, OneBitLamb, or any torch.optim class by name ("
        + ", ".join(_torch_optimizer_names())
        + ")"
    )


def _onebit_class(low: str) -> type[torch.optim.Optimizer]:
    import onebit_comm

    return getattr(onebit_comm, ONEBIT_OPTIMIZERS[low])


def _onebit_params(low: str) -> set[str]:
    """DeepSpeed's parameter names for a 1-bit optimizer (its constructor's, minus our process_group)."""
    sig = inspect.signature(_onebit_class(low).__init__)
    return {p for p in sig.parameters if p not in ("self", "params", "process_group")}


def check_optimizer_stage(type_name: str, stage: int) -> None:
    """Raise NotImplementedError for a 1-bit optimizer with a ZeRO stage other than 0.

    They all-reduce the whole (compressed) momentum, which ZeRO 1-3 partition away; DeepSpeed
    refuses the combination too.
    """
    if type_name.lower() in ONEBIT_OPTIMIZERS and int(stage) != 0:
        raise NotImplementedError(
            f"ds_config.optimizer.type {type_name!r} with zero_optimization.stage {stage}: the 1-bit optimizers "
            f"communicate the whole compressed momentum, which ZeRO stages 1-3 partition; accepted: "
            f"zero_optimization.stage 0 with {type_name}, or Adam/AdamW with any stage"
        )


def check_optimizer_layout(type_name: str, pipeline: bool, model_parallel_world_size: int) -> None:
    """Raise NotImplementedError for a 1-bit optimizer with pipeline or tensor parallelism.

    They all-reduce their compressed momentum over every rank; with stages or tensor shards the ranks hold
    different parameters, so the messages would not match (gloo aborts the process). Refused before
    anything is sent.
    """
    if type_name.lower() in ONEBIT_OPTIMIZERS and (pipeline or model_parallel_world_size > 1):
        what = (
            "a PipelineModule"
            if pipeline
            else f"model parallelism (mpu, {model_parallel_world_size} ranks per replica)"
        )
        raise NotImplementedError(
            f"ds_config.optimizer.type {type_name!r} with {what}: the 1-bit optimizers are data-parallel only "
            f"(they communicate the whole compressed momentum of identical replicas); accepted: {type_name} "
            "without pipeline/tensor parallelism, or Adam/AdamW with it"
        )


def check_optimizer(type_name: str, params: dict[str, Any]) -> None:
    """Raise ConfigError for an unknown type or a parameter the optimizer does not take ("auto" allowed)."""
    low = type_name.lower()
    if low in _ADAM_NAMES:
        allowed = ADAM_PARAMS | _ADAM_IGNORED
    elif low in ONEBIT_OPTIMIZERS:
        allowed = _onebit_params(low)
    elif low in NOT_IMPLEMENTED_OPTIMIZERS:
        return  # refused at initialize(), with a clear NotImplementedError; the config still loads
    elif low in _TORCH_LOWER or type_name in _torch_optimizer_names():
        cls = getattr(torch.optim, _TORCH_LOWER.get(low, type_name))
        allowed = {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")}
    else:
        known = {
            "Adam",
            "AdamW",
            *ONEBIT_OPTIMIZERS.values(),
            *(v.split()[0] for v in NOT_IMPLEMENTED_OPTIMIZERS.values()),
            *_torch_optimizer_names(),
        }
        raise ConfigError(
            f"ds_config.optimizer.type: unknown optimizer {type_name!r}{suggest(type_name, known)}; "
            f"accepted: {accepted_types()}"
        )
    for key in params:
        if key not in allowed:
            raise ConfigError(
                f"ds_config.optimizer.params.{key}: not a parameter of {type_name}{suggest(key, allowed)}; "
                f"accepted: {', '.join(sorted(allowed))}"
            )
    _check_hyperparameters(params)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_hyperparameters(params: dict[str, Any]) -> None:
    """The ranges torch's optimizers check at construction, reported with the key path ("auto" skipped)."""
    for key in ("lr", "eps", "weight_decay"):
        v = params.get(key, "auto")
        if v == "auto":
            continue
        if not _is_number(v) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"ds_config.optimizer.params.{key}: must be a finite number >= 0, got {v!r}")
    betas = params.get("betas", "auto")
    if betas != "auto":
        ok = isinstance(betas, list | tuple) and len(betas) == 2
        ok = ok and all(b == "auto" or (_is_number(b) and 0.0 <= b < 1.0) for b in betas)
        if not ok:
            raise ConfigError(
                f"ds_config.optimizer.params.betas: must be two numbers in [0, 1) ([beta1, beta2]), got {betas!r}"
            )


def _cpu_adam() -> type[torch.optim.Optimizer] | None:
    try:
        from ds_native.optim import CPUAdam
    except ImportError:
        return None
    return CPUAdam


def _cuda_fused_adam() -> type[torch.optim.Optimizer] | None:
    """ds-native's CUDA FusedAdam when its CUDA extension was built (DeepSpeed's default Adam on GPUs)."""
    try:
        import ds_native
        from ds_native.optim import FusedAdam
    except ImportError:
        return None
    return FusedAdam if ds_native.build_info()["cuda"] else None


def optimizer_factory(type_name: str, params: dict[str, Any], device: torch.device) -> OptimizerFactory:
    """A factory ``f(param_groups) -> Optimizer`` for a validated ``"optimizer"`` section (no "auto" left)."""
    check_optimizer(type_name, params)
    low = type_name.lower()
    if low in NOT_IMPLEMENTED_OPTIMIZERS:
        raise NotImplementedError(
            f"ds_config.optimizer.type {type_name!r}: {NOT_IMPLEMENTED_OPTIMIZERS[low]} is not implemented in zero-all "
            f"yet; accepted: {accepted_types()}"
        )
    if low in ONEBIT_OPTIMIZERS:
        cls = _onebit_class(low)
        kw = {k: (tuple(v) if k == "betas" else v) for k, v in params.items()}
        return _keyed_errors(type_name, lambda groups: cls(groups, **kw))
    params = {k: v for k, v in params.items() if k not in _ADAM_IGNORED}
    if low in _ADAM_NAMES:
        return _keyed_errors(type_name, _adam_factory(params, device))
    cls = getattr(torch.optim, _TORCH_LOWER.get(low, type_name))
    return _keyed_errors(type_name, lambda groups: cls(groups, **params))


def _keyed_errors(type_name: str, factory: OptimizerFactory) -> OptimizerFactory:
    """Re-raise the optimizer constructor's own checks (torch's "Invalid momentum value"...) with the key path."""

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        try:
            return factory(groups)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"ds_config.optimizer.params: {type_name} refused its parameters: {e}") from e

    return make


def _adam_factory(params: dict[str, Any], device: torch.device) -> OptimizerFactory:
    params = dict(params)
    torch_adam = bool(params.pop("torch_adam", False))
    adam_w_mode = bool(params.pop("adam_w_mode", True))  # DeepSpeed: "Adam" is AdamW by default
    bias_correction = bool(params.pop("bias_correction", True))
    # DeepSpeed's Adam defaults to no weight decay (torch's AdamW would default to 0.01).
    params.setdefault("weight_decay", 0.0)
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    native = not torch_adam and not params.get("amsgrad")
    cpu_adam = _cpu_adam() if device.type == "cpu" and native else None
    if cpu_adam is not None:
        return lambda groups: cpu_adam(groups, adamw_mode=adam_w_mode, bias_correction=bias_correction, **params)
    # On CUDA, as DeepSpeed does: the fused multi-tensor kernel unless torch_adam (one pass over p, g, m, v;
    # torch's default foreach AdamW makes several).
    fused_adam = _cuda_fused_adam() if device.type == "cuda" and native else None
    if fused_adam is not None:
        return lambda groups: fused_adam(groups, adamw_mode=adam_w_mode, bias_correction=bias_correction, **params)
    if not bias_correction:
        raise ConfigError(
            "ds_config.optimizer.params.bias_correction=false needs ds-native's CPUAdam or CUDA FusedAdam "
            "(torch_adam false); "
            "torch's Adam/AdamW always apply bias correction"
        )
    cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    return lambda groups: cls(groups, **params)
