"""Fill ``"auto"`` values from initialize()'s arguments, or refuse them with a reason.

Hugging Face-style configs write ``"auto"`` for values the training script knows. zero-all
resolves each from what initialize() was given (the model, the client optimizer, the data
loader, the world size); where nothing determines a value the error names the key and what
would resolve it. The rules (also in docs/config.md):

=============================================  ===============================================
key                                            resolved from
=============================================  ===============================================
train_micro_batch_size_per_gpu                 ``training_data``'s DataLoader batch size, else
                                               the other two batch keys
train_batch_size, gradient_accumulation_steps  the batch arithmetic (accumulation defaults to 1)
gradient_clipping                              0.0 (off, DeepSpeed's default)
fp16.enabled / bf16.enabled                    the model's parameter dtype (float16 / bfloat16)
optimizer.params.*                             the client optimizer's param group 0; without one:
                                               betas/eps/weight_decay take DeepSpeed's defaults,
                                               lr is an error
scheduler.params.warmup_max_lr                 the optimizer's lr
scheduler.params.warmup_min_lr                 0
zero_optimization.reduce_bucket_size etc.      ``model.config.hidden_size`` as Hugging Face does,
                                               else DeepSpeed's defaults
anything else                                  an error naming the key
=============================================  ===============================================
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from zero_all.config.loader import ConfigError

__all__ = ["AutoContext", "resolve_auto"]

_ADAM_DEFAULTS = {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
_ZERO_DEFAULTS = {  # DeepSpeed's defaults, used when the model does not say its hidden size
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}


@dataclass
class AutoContext:
    """What initialize() knows that an "auto" value may come from."""

    model: torch.nn.Module | None = None
    client_optimizer: Any = None
    dataloader_batch_size: int | None = None
    client_lr_scheduler: bool = False


def _model_dtype(model: torch.nn.Module | None) -> torch.dtype | None:
    if model is None:
        return None
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _hidden_size(model: torch.nn.Module | None) -> int | None:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "hidden_size", None)
    if size is None and isinstance(cfg, dict):
        size = cfg.get("hidden_size")
    return int(size) if isinstance(size, int) else None


def _client_hyper(opt: Any) -> dict[str, Any] | None:
    groups = getattr(opt, "param_groups", None)
    if not groups:
        return None
    return groups[0]


def resolve_auto(raw: dict[str, Any], ctx: AutoContext) -> dict[str, Any]:
    """A copy of ``raw`` with every "auto" resolved; ConfigError for one that cannot be."""
    cfg = copy.deepcopy(raw)

    # Batch keys: "auto" means "not given"; the batch arithmetic fills them in later.
    if cfg.get("train_micro_batch_size_per_gpu") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = ctx.dataloader_batch_size
    for key in ("train_batch_size", "gradient_accumulation_steps"):
        if cfg.get(key) == "auto":
            cfg[key] = None
    if cfg.get("gradient_clipping") == "auto":
        cfg["gradient_clipping"] = 0.0

    dtype = _model_dtype(ctx.model)
    fp16 = cfg.get("fp16") or {}
    bf16 = cfg.get("bf16") or {}
    if fp16.get("enabled") == "auto":
        fp16["enabled"] = dtype == torch.float16
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = dtype == torch.bfloat16 and fp16.get("enabled") is not True

    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        client = _client_hyper(ctx.client_optimizer)
        for key, value in list(params.items()):
            if value != "auto":
                continue
            if client is not None and key in client:
                v = client[key]
                params[key] = list(v) if isinstance(v, tuple) else (float(v) if isinstance(v, torch.Tensor) else v)
            elif key in _ADAM_DEFAULTS and str(opt.get("type", "")).lower() in ("adam", "adamw"):
                params[key] = _ADAM_DEFAULTS[key]
            else:
                raise ConfigError(
                    f"ds_config.optimizer.params.{key} is 'auto' but nothing determines it: pass a client optimizer "
                    f"(initialize(optimizer=...)) that has {key!r}, or write the value in the config"
                )

    sched = cfg.get("scheduler")
    if sched is not None and ctx.client_lr_scheduler:
        # The client's scheduler wins (as in DeepSpeed); the config's is not built, so its autos do not matter.
        cfg.pop("scheduler")
    elif sched is not None:
        params = sched.setdefault("params", {})
        opt_lr = (opt or {}).get("params", {}).get("lr")
        if opt_lr is None and (client := _client_hyper(ctx.client_optimizer)) is not None:
            opt_lr = client.get("lr")
        for key, value in list(params.items()):
            if value != "auto":
                continue
            if key == "warmup_max_lr" and opt_lr is not None:
                params[key] = float(opt_lr)
            elif key == "warmup_min_lr":
                params[key] = 0.0
            else:
                raise ConfigError(
                    f"ds_config.scheduler.params.{key} is 'auto' but nothing determines it (zero-all cannot know the "
                    "length of your run): write the value in the config or pass lr_scheduler= to initialize()"
                )

    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict):
        hidden = _hidden_size(ctx.model)
        by_hidden = (
            {
                "reduce_bucket_size": hidden * hidden,
                "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                "stage3_param_persistence_threshold": 10 * hidden,
            }
            if hidden
            else _ZERO_DEFAULTS
        )
        for key, value in list(zero.items()):
            if value == "auto" and key in by_hidden:
                zero[key] = by_hidden[key]

    pipeline = cfg.get("pipeline")
    if isinstance(pipeline, dict) and pipeline.get("stages") == "auto":
        # DeepSpeed's default: the PipelineModule's own stage count (the section's default is "auto").
        del pipeline["stages"]

    leftover = _find_auto(cfg)
    if leftover:
        raise ConfigError(f"ds_config.{leftover} is 'auto', which zero-all cannot resolve; write a value")
    return cfg


def _find_auto(node: Any, path: str = "") -> str | None:
    if node == "auto":
        return path
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_auto(v, f"{path}.{k}" if path else k)
            if found:
                return found
    if isinstance(node, list):
        for i, v in enumerate(node):
            found = _find_auto(v, f"{path}[{i}]")
            if found:
                return found
    return None
