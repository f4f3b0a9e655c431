"""``initialize()``: DeepSpeed's entry point, same arguments and return value.

``engine, optimizer, dataloader, lr_scheduler = zero_all.initialize(model=..., config=...)``.
The steps, each one call into the package that owns it: join the process group, read and
validate the config, resolve "auto" values and the batch triple, cast the model to the
training dtype, build the ZeRO optimizer (zero-shard) with the loss scaler (amp-scaler), the
LR schedule, the data loader and activation checkpointing (act-ckpt).
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

from zero_all.config.auto import AutoContext, resolve_auto
from zero_all.config.batch import resolve_batch_sizes
from zero_all.config.loader import ConfigError
from zero_all.config.model import TORCH_DTYPES, ZeroAllConfig, load_config
from zero_all.distributed import get_device, init_distributed
from zero_all.engine import Engine
from zero_all.optim import OptimizerFactory, check_optimizer_layout, check_optimizer_stage, optimizer_factory
from zero_all.pipeline import attach_pipeline, norm_replicated_params, parallel_layout, pipeline_schedule
from zero_all.schedulers import build_scheduler

__all__ = ["add_config_arguments", "config_from_args", "initialize"]


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """DeepSpeed's ``--deepspeed`` / ``--deepspeed_config`` arguments (and the deprecated ``--deepscale*`` pair)."""
    group = parser.add_argument_group("zero-all", "DeepSpeed-compatible configuration")
    group.add_argument("--deepspeed", default=False, action="store_true", help="enable the engine (accepted)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="ds_config.json path")
    group.add_argument("--deepscale", default=False, action="store_true", help="deprecated spelling of --deepspeed")
    group.add_argument("--deepscale_config", default=None, type=str, help="deprecated spelling of --deepspeed_config")
    return parser


def config_from_args(args: Any, config: Any, config_params: Any = None) -> Any:
    """The one config source among ``config=``, ``config_params=`` and ``args.deepspeed_config``, as DeepSpeed picks it.

    ``args.deepscale_config`` (deprecated) is read as ``args.deepspeed_config`` (and moved there, as
    DeepSpeed does); giving both, or giving ``args.deepspeed_config`` together with ``config=``, is
    an error: DeepSpeed refuses to guess which one was meant.
    """
    if config is None:
        config = config_params
    old = getattr(args, "deepscale_config", None)
    if old is not None:
        warnings.warn("--deepscale_config is deprecated, use --deepspeed_config", DeprecationWarning, stacklevel=3)
        if getattr(args, "deepspeed_config", None) is not None:
            raise ConfigError(
                "initialize(): both args.deepscale_config and args.deepspeed_config are set; keep --deepspeed_config"
            )
        args.deepspeed_config = old
        args.deepscale_config = None
    from_args = getattr(args, "deepspeed_config", None)
    if from_args is not None:
        if config is not None:
            raise ConfigError(
                f"initialize(): a config was given both as args.deepspeed_config ({from_args!r}) and as config=/"
                "config_params=; pass only one (DeepSpeed refuses this too)"
            )
        config = from_args
    if config is None:
        raise ConfigError(
            "initialize() needs config= (a ds_config path, dict or JSON/hjson string) or args.deepspeed_config"
        )
    return config


def _compute_dtype(cfg: ZeroAllConfig) -> torch.dtype:
    from amp_scaler import check_precision

    check_precision(cfg.fp16, cfg.bf16)
    if cfg.fp16.enabled is True:
        return torch.float16
    if cfg.bf16.enabled is True:
        return torch.bfloat16
    return torch.float32


def _grad_accum_dtype(cfg: ZeroAllConfig, compute_dtype: torch.dtype) -> torch.dtype | None:
    """``data_types.grad_accum_dtype`` as a torch dtype (None: the model's dtype, DeepSpeed's default)."""
    name = cfg.data_types.grad_accum_dtype
    if name is None:
        return None
    dtype = TORCH_DTYPES[name]
    if dtype not in (torch.float32, compute_dtype):
        raise ConfigError(
            f"ds_config.data_types.grad_accum_dtype: {name!r} with a {compute_dtype} model is not supported; "
            f"accepted: 'fp32' or the model's own dtype"
        )
    return dtype


def _cast_unmanaged(model: torch.nn.Module, dtype: torch.dtype, managed: set[int]) -> None:
    """Buffers and frozen parameters to the compute dtype (as DeepSpeed's module.bfloat16()/half() does).

    The parameters zero-shard manages are left alone: it takes the fp32 master from their
    full-precision values and casts them itself.
    """
    if dtype == torch.float32:
        return
    with torch.no_grad():
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.is_floating_point():
                    module._buffers[name] = buf.to(dtype)
            for p in module.parameters(recurse=False):
                if id(p) not in managed and p.is_floating_point():
                    p.data = p.data.to(dtype)


def _named_groups(model: torch.nn.Module, params: Iterable[Any] | None) -> list[dict[str, Any]]:
    """Param groups as zero-shard wants them: ``{"params": [(name, p), ...], **hyper}``."""
    names = {id(p): n for n, p in model.named_parameters()}
    if params is None:
        return [{"params": [(n, p) for n, p in model.named_parameters() if p.requires_grad]}]
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = []
    for g in groups:
        named = []
        for p in g["params"]:
            if isinstance(p, tuple):
                named.append(p)
            elif id(p) in names:
                named.append((names[id(p)], p))
            else:
                raise ValueError("model_parameters holds a tensor that is not a parameter of model")
        out.append({**{k: v for k, v in g.items() if k != "params"}, "params": named})
    return out


def _client_factory(optimizer: Any) -> OptimizerFactory:
    if isinstance(optimizer, torch.optim.Optimizer):
        return _adopt(optimizer)
    if callable(optimizer):
        return optimizer
    raise TypeError(
        f"optimizer must be a torch.optim.Optimizer or a callable(params) -> Optimizer, got {type(optimizer).__name__}"
    )


def _adopt(optimizer: torch.optim.Optimizer) -> OptimizerFactory:
    """A factory that re-points the client's own optimizer object at zero-shard's fp32 partitions.

    DeepSpeed does the same: the client's optimizer becomes the "basic optimizer" whose param groups
    hold the flat partitions, so a scheduler built over it before initialize() keeps scheduling the
    optimizer that trains, and the object keeps its class, hyperparameters and hooks. Any state it
    held is dropped (it was keyed by the model's parameters, which it no longer holds).
    """

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        optimizer.param_groups = []
        optimizer.state = defaultdict(dict)
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    return make


def _client_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return _named_groups(model, [dict(g) for g in optimizer.param_groups])


def _build_dataloader(
    training_data: Any,
    micro_batch: int,
    collate_fn: Callable | None,
    drop_last: bool,
    data_parallel: tuple[int, int] | None = None,
) -> DataLoader | None:
    if training_data is None:
        return None
    from zero_all.data.loader import build_dataloader

    # With model parallelism the ranks of one replica (pipeline stages) read the same samples.
    replicas, rank = data_parallel if data_parallel is not None else (None, None)
    return build_dataloader(
        training_data, micro_batch, collate_fn=collate_fn, drop_last=drop_last, rank=rank, world_size=replicas
    )


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Iterable[Any] | None = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int | None = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Callable | None = None,
    config: str | os.PathLike[str] | dict[str, Any] | ZeroAllConfig | None = None,
    config_params: Any = None,
) -> tuple[Engine, Any, DataLoader | None, Any]:
    """Build the engine; returns ``(engine, optimizer, dataloader, lr_scheduler)`` as DeepSpeed does.

    ``config`` is a path, a dict, a JSON string or a ZeroAllConfig (``config_params`` and
    ``args.deepspeed_config`` are DeepSpeed's older spellings). ``optimizer`` may be a torch
    optimizer (its class and hyperparameters are rebuilt over zero-shard's partitions) or a
    callable ``params -> Optimizer``; without one the config's ``"optimizer"`` section is used.
    ``lr_scheduler`` may be a callable ``optimizer -> scheduler`` (preferred) or a scheduler.
    """
    if model is None:
        raise ValueError("initialize() needs model=")
    config = config_from_args(args, config, config_params)
    init_distributed(distributed_port=distributed_port, dist_init_required=dist_init_required)
    cfg = load_config(config)
    # Pipeline / model parallelism: ZeRO and the batch arithmetic use the data-parallel axis only.
    layout = parallel_layout(model, mpu, cfg)
    world_size = layout.data_parallel_world_size
    loader_batch = training_data.batch_size if isinstance(training_data, DataLoader) else None
    ctx = AutoContext(model, optimizer, loader_batch, client_lr_scheduler=lr_scheduler is not None)
    micro_was_auto = cfg.train_micro_batch_size_per_gpu == "auto"
    opt_auto = any(v == "auto" for v in ((cfg.raw.get("optimizer") or {}).get("params") or {}).values())
    cfg = ZeroAllConfig.from_dict(resolve_auto(cfg.raw, ctx), warn=False)
    try:
        batch = resolve_batch_sizes(
            cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps, world_size
        )
    except ConfigError as e:
        if micro_was_auto:
            raise ConfigError(
                f"{e}. train_micro_batch_size_per_gpu is 'auto': pass training_data as a DataLoader (its batch_size "
                "is used) or give two of the three batch keys"
            ) from None
        raise
    # ds_config.pipeline: checked against the PipelineModule before anything is built.
    schedule = pipeline_schedule(model, cfg, batch.gradient_accumulation_steps) if layout.pipeline else None
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)

    device = get_device()
    dtype = _compute_dtype(cfg)
    model.to(device=device)

    if cfg.optimizer is not None:
        if optimizer is not None and not opt_auto:
            warnings.warn(
                "both ds_config.optimizer and optimizer= were given: the config's optimizer is used",
                UserWarning,
                stacklevel=2,
            )
        check_optimizer_stage(cfg.optimizer.type, int(cfg.zero_optimization.stage))
        check_optimizer_layout(cfg.optimizer.type, layout.pipeline, layout.model_parallel_world_size)
        # With offload_optimizer the fp32 partitions live in host memory: the optimizer is ds-native's CPU Adam.
        offload = cfg.zero_optimization.offload_optimizer
        opt_device = torch.device("cpu") if offload is not None and offload.enabled else device
        factory = optimizer_factory(cfg.optimizer.type, dict(cfg.optimizer.params), opt_device)
        groups = _named_groups(model, model_parameters)
    elif optimizer is not None:
        factory = _client_factory(optimizer)
        if isinstance(optimizer, torch.optim.Optimizer) and model_parameters is None:
            groups = _client_groups(model, optimizer)
        else:
            groups = _named_groups(model, model_parameters)
    else:
        raise ConfigError("no optimizer: set ds_config.optimizer or pass optimizer= to initialize()")

    from amp_scaler import create_loss_scaler
    from zero_shard import ZeroShardedOptimizer

    if int(cfg.zero_optimization.stage) != 3:
        from zero_shard.init import materialize_partitioned

        # A model built under zero.Init used at stages 0-2: make its parameters whole (one at a time).
        materialize_partitioned(model.parameters())
    scaler = create_loss_scaler(cfg.fp16 if cfg.fp16.enabled is True else None)
    zero_opt = ZeroShardedOptimizer(
        groups,
        factory,
        cfg.zero_optimization,
        compute_dtype=dtype,
        loss_scaler=scaler,
        gradient_clipping=float(cfg.gradient_clipping),
        gradient_predivide_factor=float(cfg.gradient_predivide_factor),
        grad_accum_dtype=_grad_accum_dtype(cfg, dtype),
        process_group=layout.data_parallel_group,
        module=model if int(cfg.zero_optimization.stage) == 3 else None,
        # Pipeline/tensor parallelism: clipping and fp16 overflow see the whole model (each element once).
        model_parallel_group=layout.model_parallel_group,
        replicated_params=norm_replicated_params(model, layout),
        aio_config=cfg.aio,
    )

    if cfg.gradient_allreduce_op == "sum":
        # DeepSpeed's "sum": data-parallel gradients are summed, not averaged. zero-shard's reducer
        # multiplies the reduced sum by `post` (= predivide / N for the mean); dropping the 1/N gives the sum.
        zero_opt.reducer.post *= zero_opt.world_size
    _cast_unmanaged(model, dtype, {id(p) for g in groups for _, p in g["params"]})
    scheduler = _build_lr_scheduler(lr_scheduler, optimizer, zero_opt, cfg)
    dataloader = _build_dataloader(
        training_data,
        batch.train_micro_batch_size_per_gpu,
        collate_fn,
        cfg.dataloader_drop_last,
        layout.data_parallel_rank_and_size(),
    )
    if "activation_checkpointing" in cfg.raw:
        from act_ckpt import checkpointing

        checkpointing.configure(None, deepspeed_config=cfg.raw)

    engine = Engine(
        model,
        zero_opt,
        scheduler,
        cfg,
        batch,
        device=device,
        process_group=layout.data_parallel_group,
        training_dataloader=dataloader,
    )
    engine.model_parallel_world_size = layout.model_parallel_world_size
    if layout.pipeline:
        engine.pipeline = attach_pipeline(
            engine, model, zero_opt, batch.gradient_accumulation_steps, schedule, recv_ahead=cfg.pipeline.recv_ahead
        )
    return engine, _returned_optimizer(zero_opt, cfg), dataloader, scheduler


def _returned_optimizer(zero_opt: Any, cfg: ZeroAllConfig) -> torch.optim.Optimizer:
    """What initialize() hands back: DeepSpeed returns the basic optimizer itself at stage 0 without
    fp16/bf16 (the client's own object when one was passed), else the ZeRO wrapper. Both are
    ``torch.optim.Optimizer`` instances sharing one set of param groups."""
    if int(cfg.zero_optimization.stage) == 0 and zero_opt.compute_dtype == torch.float32:
        return zero_opt.inner
    return zero_opt


def _build_lr_scheduler(client: Any, client_optimizer: Any, zero_opt: Any, cfg: ZeroAllConfig) -> Any:
    if client is None:
        if cfg.scheduler is None:
            return None
        return build_scheduler(cfg.scheduler.type, zero_opt, dict(cfg.scheduler.params))
    if hasattr(client, "step") and hasattr(client, "optimizer"):
        # A scheduler built over the client optimizer: that object is now zero-shard's inner optimizer
        # (see _adopt); one built over an optimizer that the config's "optimizer" replaced is re-pointed.
        if client.optimizer is client_optimizer and client_optimizer is not zero_opt.inner:
            client.optimizer = zero_opt
        return client
    if callable(client):
        # DeepSpeed calls it with the basic optimizer (zero-shard's inner one; same param groups).
        return client(zero_opt.inner)
    raise TypeError(
        f"lr_scheduler must be a scheduler or a callable(optimizer) -> scheduler, got {type(client).__name__}"
    )
