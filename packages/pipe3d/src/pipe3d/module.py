"""``PipelineModule``: a sequence of layers split into pipeline stages (DeepSpeed's API).

The model is a list of layers whose outputs feed the next layer's input. Layers are given as
:class:`LayerSpec` (class + arguments, built only on the stage that owns the layer), as
:class:`TiedLayerSpec` (a module shared by several layers, e.g. an embedding reused as the LM head,
built on every stage that uses it and kept equal there), as ``nn.Module`` instances, or as plain
callables (no parameters).

Partitioning (``partition_method``): ``"parameters"`` balances the parameter counts (counted on the
meta device: nothing is allocated for other stages' layers, unlike DeepSpeed, which builds every
layer on every rank to count), ``"uniform"`` the number of layers, ``"type:REGEX"`` the layers whose
class name matches REGEX (case-insensitive), e.g. ``"type:TransformerBlock"``.

Virtual stages: with ``num_chunks = v`` (for the interleaved schedule) the layers are split into
``P * v`` parts and stage ``s`` holds parts ``s, s + P, ...`` as its chunks.

Activation checkpointing: ``activation_checkpoint_interval = k`` checkpoints every run of ``k``
layers of a chunk with act-ckpt (torch's non-reentrant checkpoint), so a first layer whose input
is integer token ids works (DeepSpeed's reentrant default fails there with "element 0 of tensors
does not require grad"). As in DeepSpeed, runs without parameters are not checkpointed.

[Note: tied weights across stages] Each stage that uses a tied module holds its own copy,
synchronized from the first such stage at construction. During a batch, a stage runs the tied
module on *proxy* leaves (the same storage, detached), so the tied gradients collect in the
proxies, outside the optimizer's gradient hooks. After the last backward the proxies' gradients
are summed over the stages that share the key (DeepSpeed's ``allreduce_tied_weight_gradients``)
and handed to every copy, which then steps identically.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipe3d.topology import PipeDataParallelTopology, PipelineParallelGrid, ProcessTopology

__all__ = ["LayerSpec", "PipelineModule", "TiedLayerSpec", "partition_balanced", "partition_uniform"]


class LayerSpec:
    """A layer to build later: ``LayerSpec(nn.Linear, 16, 32, bias=False)`` builds ``nn.Linear(16, 32, bias=False)``.

    Only the stage that owns the layer calls :meth:`build`; the others never allocate it.
    """

    def __init__(self, typename: type[nn.Module], *module_args: Any, **module_kwargs: Any) -> None:
        if not (isinstance(typename, type) and issubclass(typename, nn.Module)):
            raise TypeError(f"LayerSpec needs an nn.Module subclass, got {typename!r}")
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def build(self) -> nn.Module:
        """Construct the module."""
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self) -> str:
        return f"LayerSpec({self.typename.__name__})"


class TiedLayerSpec(LayerSpec):
    """A layer whose module is shared by every TiedLayerSpec with the same ``key``.

    ``forward_fn(module, x)``, when given, replaces ``module(x)`` for this use (e.g. the LM head as
    ``lambda emb, h: h @ emb.weight.t()``). ``tied_weight_attr`` names the attributes kept equal
    across stages (default ``["weight"]``; dotted names reach into submodules).
    """

    def __init__(
        self,
        key: str,
        typename: type[nn.Module],
        *module_args: Any,
        forward_fn: Callable[..., Any] | None = None,
        tied_weight_attr: str | Sequence[str] = ("weight",),
        **module_kwargs: Any,
    ) -> None:
        super().__init__(typename, *module_args, **module_kwargs)
        self.key = str(key)
        self.forward_fn = forward_fn
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)

    def __repr__(self) -> str:
        return f"TiedLayerSpec({self.key!r}, {self.typename.__name__})"


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Boundaries of ``num_parts`` contiguous parts of near-equal size (the first parts take the extra)."""
    base, extra = divmod(num_items, num_parts)
    bounds = [0]
    for p in range(num_parts):
        bounds.append(bounds[-1] + base + (1 if p < extra else 0))
    return bounds


def partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """Boundaries of ``num_parts`` non-empty contiguous parts minimizing the heaviest part.

    The smallest feasible bottleneck is found exactly (dynamic programming over the prefix sums,
    fine for the few hundred layers a model has); then parts are filled left to right up to it,
    leaving one item for every part still to fill.
    """
    n = len(weights)
    if n < num_parts:
        raise ValueError(f"cannot split {n} layers into {num_parts} non-empty parts")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = float("inf")
    # best[k][i]: smallest bottleneck splitting the first i items into k parts.
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0.0
    for k in range(1, num_parts + 1):
        for i in range(k, n - (num_parts - k) + 1):
            best[k][i] = min(max(best[k - 1][j], prefix[i] - prefix[j]) for j in range(k - 1, i))
    limit = best[num_parts][n]
    bounds, start = [0], 0
    for k in range(num_parts - 1):
        end = start + 1
        # Take more while the part stays under the bottleneck and what is left can still be split.
        while end < n - (num_parts - k - 1) and prefix[end + 1] - prefix[start] <= limit + 1e-9:
            end += 1
        bounds.append(end)
        start = end
    bounds.append(n)
    return bounds


def _layer_name(layer: Any) -> str:
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", type(layer).__name__)


def _count_params(layer: Any) -> int:
    """Trainable parameters of a layer, counted without allocating it (meta device)."""
    if isinstance(layer, nn.Module):
        return sum(p.numel() for p in layer.parameters() if p.requires_grad)
    if isinstance(layer, LayerSpec):
        with torch.device("meta"):
            module = layer.build()
        return sum(p.numel() for p in module.parameters() if p.requires_grad)
    return 0


def _getattr_dotted(module: nn.Module, name: str) -> Any:
    for part in name.split("."):
        module = getattr(module, part)
    return module


class PipelineModule(nn.Module):
    """Layers split into pipeline stages; this rank builds and runs only its own stage's layers.

    Args (DeepSpeed's names):
        layers: the layer sequence (LayerSpec / TiedLayerSpec / nn.Module / callable), or an nn.Sequential.
        num_stages: pipeline stages ``P`` (or give ``topology``); the data-parallel degree is
            ``world_size / P``.
        topology: a :class:`~pipe3d.topology.ProcessTopology` with a ``pipe`` axis.
        loss_fn: ``loss_fn(outputs, labels)`` on the last stage (None: the last layer returns the loss).
        seed_layers / base_seed / seed_fn: seed ``base_seed + layer_index`` before building each layer,
            so a layer's initial weights do not depend on the partitioning.
        partition_method: ``"parameters"`` (default), ``"uniform"`` or ``"type:REGEX"``.
        activation_checkpoint_interval: checkpoint runs of this many layers (0: off).
        activation_checkpoint_func: the checkpoint function (default: act-ckpt's, non-reentrant).
        checkpointable_layers: class names eligible for checkpointing (default: any run with parameters).
        num_chunks: model chunks per stage for the interleaved schedule (Megatron's virtual stages).
        grid: an existing :class:`~pipe3d.topology.PipelineParallelGrid` of ``topology`` to reuse (e.g.
            the one whose tensor-parallel group the layers were given); None: build one.

    Without torch.distributed (or with ``num_stages=1``) the whole model is one stage, which is
    also the single-process reference the tests compare against.
    """

    def __init__(
        self,
        layers: Sequence[Any] | nn.Sequential,
        num_stages: int | None = None,
        topology: ProcessTopology | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        seed_layers: bool = False,
        seed_fn: Callable[[int], None] | None = None,
        base_seed: int = 1234,
        partition_method: str = "parameters",
        activation_checkpoint_interval: int = 0,
        activation_checkpoint_func: Callable[..., Any] | None = None,
        checkpointable_layers: Sequence[str] | None = None,
        num_chunks: int = 1,
        grid: PipelineParallelGrid | None = None,
    ) -> None:
        super().__init__()
        if grid is not None:
            topology = grid.topology() if topology is None else topology
            if topology is not grid.topology():
                raise ValueError("grid= was built from another topology than topology=")
        if num_stages is None and topology is None:
            raise ValueError("PipelineModule needs num_stages= or topology=")
        if activation_checkpoint_interval < 0:
            raise ValueError(f"activation_checkpoint_interval must be >= 0, got {activation_checkpoint_interval}")
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        self._layer_specs = list(layers.children() if isinstance(layers, nn.Sequential) else layers)
        self.loss_fn = loss_fn
        self.seed_layers, self.seed_fn, self.base_seed = seed_layers, seed_fn, base_seed
        self.activation_checkpoint_interval = int(activation_checkpoint_interval)
        self.checkpointable_layers = list(checkpointable_layers) if checkpointable_layers is not None else None
        self.num_chunks = int(num_chunks)
        self.partition_method = partition_method
        self._ckpt_func = activation_checkpoint_func

        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        if topology is None:
            if world % num_stages != 0:
                raise ValueError(f"PipelineModule: num_stages={num_stages} does not divide the world size {world}")
            topology = PipeDataParallelTopology(num_pp=num_stages, num_dp=world // num_stages)
        elif num_stages is not None and topology.get_dim("pipe") != num_stages:
            raise ValueError(f"num_stages={num_stages} but the topology has {topology.get_dim('pipe')} pipe stages")
        if "pipe" not in topology.get_axis_names():
            raise ValueError(f"the topology needs a 'pipe' axis, has {topology.get_axis_names()}")
        self._topo = topology
        self.num_stages = topology.get_dim("pipe")
        if distributed:
            self._grid: PipelineParallelGrid | None = grid if grid is not None else PipelineParallelGrid(topology)
            self.global_rank = dist.get_rank()
            self.stage_id = self._grid.get_stage_id()
        else:
            if topology.world_size() != 1:
                raise RuntimeError(f"a {topology} needs torch.distributed to be initialized first")
            self._grid, self.global_rank, self.stage_id = None, 0, 0

        self.parts = self._partition(partition_method)
        # Chunk c of stage s is part c * P + s.
        self.chunk_bounds = [
            (self.parts[c * self.num_stages + self.stage_id], self.parts[c * self.num_stages + self.stage_id + 1])
            for c in range(self.num_chunks)
        ]
        self.tied_modules = nn.ModuleDict()
        self.tied_weight_attrs: dict[str, list[str]] = {}
        self.forward_funcs: list[list[Any]] = []
        self._build()
        self._tied_stage_groups = self._make_tied_groups()
        self._tied_proxies: dict[str, dict[str, torch.Tensor]] | None = None
        self._synchronize_tied_weights()

    # ---- partitioning and building ---------------------------------------------------------------
    def _partition(self, method: str) -> list[int]:
        parts = self.num_stages * self.num_chunks
        n = len(self._layer_specs)
        if n < parts:
            raise ValueError(
                f"PipelineModule: {n} layers cannot fill {self.num_stages} stages × {self.num_chunks} chunks; "
                "every stage (chunk) needs at least one layer"
            )
        m = method.lower()
        if m == "uniform":
            return partition_uniform(n, parts)
        if m == "parameters":
            return partition_balanced([_count_params(x) for x in self._layer_specs], parts)
        if m.startswith("type:"):
            pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
            weights = [1 if pattern.search(_layer_name(x)) else 0 for x in self._layer_specs]
            if not any(weights):
                names = sorted({_layer_name(x) for x in self._layer_specs})
                raise ValueError(f"partition_method {method!r} matches no layer; layer types: {names}")
            return partition_balanced(weights, parts)
        raise ValueError(f"unknown partition_method {method!r}; accepted: 'parameters', 'uniform', 'type:REGEX'")

    def _build(self) -> None:
        for lo, hi in self.chunk_bounds:
            funcs: list[Any] = []
            for idx in range(lo, hi):
                spec = self._layer_specs[idx]
                if self.seed_layers:
                    (self.seed_fn or torch.manual_seed)(self.base_seed + idx)
                if isinstance(spec, TiedLayerSpec):
                    if spec.key not in self.tied_modules:
                        self.tied_modules[spec.key] = spec.build()
                        self.tied_weight_attrs[spec.key] = spec.tied_weight_attr
                    funcs.append(_TiedCall(self, spec.key, spec.forward_fn))
                elif isinstance(spec, LayerSpec):
                    module = spec.build()
                    self.add_module(str(idx), module)
                    funcs.append(module)
                elif isinstance(spec, nn.Module):
                    self.add_module(str(idx), spec)
                    funcs.append(spec)
                elif callable(spec):
                    funcs.append(spec)
                else:
                    raise TypeError(f"layer {idx} is {type(spec).__name__}: expected a LayerSpec, module or callable")
            self.forward_funcs.append(funcs)

    def tied_stages(self) -> dict[str, list[int]]:
        """Every tied key and the stages that use it (computed from the specs, same on all ranks)."""
        out: dict[str, set[int]] = {}
        P = self.num_stages
        for part in range(P * self.num_chunks):
            for idx in range(self.parts[part], self.parts[part + 1]):
                spec = self._layer_specs[idx]
                if isinstance(spec, TiedLayerSpec):
                    out.setdefault(spec.key, set()).add(part % P)
        return {k: sorted(v) for k, v in sorted(out.items())}

    def _make_tied_groups(self) -> dict[str, Any]:
        """One process group per tied key used by several stages, per data/model coordinate."""
        groups: dict[str, Any] = {}
        if self._grid is None:
            return groups
        topo = self._topo
        others = [a for a in topo.get_axis_names() if a != "pipe"]
        me = topo.get_coord(self.global_rank)
        for key, stages in self.tied_stages().items():
            if len(stages) < 2:
                continue
            for ranks_list in topo.get_axis_comm_lists("pipe"):
                coord = topo.get_coord(ranks_list[0])
                ranks = [ranks_list[s] for s in stages]
                group = dist.new_group(ranks=ranks)  # collective: every rank creates every group
                if all(getattr(coord, a) == getattr(me, a) for a in others) and self.stage_id in stages:
                    groups[key] = (group, ranks)
                    # After the tied sum every stage holds the same gradient: a global norm counts it on
                    # the first stage only (DeepSpeed's ds_pipe_replicated; only the tied attributes are shared).
                    for _, p in self._tied_params(key):
                        p.ds_pipe_replicated = self.stage_id != stages[0]  # type: ignore[attr-defined]
        return groups

    def _tied_params(self, key: str) -> list[tuple[str, torch.Tensor]]:
        return [(a, _getattr_dotted(self.tied_modules[key], a)) for a in self.tied_weight_attrs[key]]

    def _synchronize_tied_weights(self) -> None:
        """Copy the tied weights from the first stage that uses each key to the others."""
        with torch.no_grad():
            for key, (group, ranks) in self._tied_stage_groups.items():
                for _, p in self._tied_params(key):
                    dist.broadcast(p.data, src=ranks[0], group=group)

    # ---- tied-weight proxies (see [Note: tied weights across stages]) ------------------------------
    def begin_tied_batch(self) -> None:
        """Before a batch's first forward: fresh proxy leaves for the tied weights shared across stages."""
        self._tied_proxies = {
            key: {a: p.detach().requires_grad_(p.requires_grad) for a, p in self._tied_params(key)}
            for key in self._tied_stage_groups
        }

    def end_tied_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """After the last backward: ``[(parameter, gradient summed over the tied stages)]`` to deliver."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        proxies, self._tied_proxies = self._tied_proxies, None
        if not proxies:
            return out
        for key, (group, _) in self._tied_stage_groups.items():
            for attr, p in self._tied_params(key):
                if not p.requires_grad:
                    continue
                proxy = proxies[key][attr]
                g = proxy.grad if proxy.grad is not None else torch.zeros_like(p)
                dist.all_reduce(g, group=group)
                out.append((p, g))
        return out

    @contextlib.contextmanager
    def _tied_swap(self, key: str) -> Iterator[nn.Module]:
        module = self.tied_modules[key]
        proxies = (self._tied_proxies or {}).get(key)
        if not proxies:
            yield module
            return
        saved = []
        for attr, proxy in proxies.items():
            owner_name, _, leaf = attr.rpartition(".")
            owner = _getattr_dotted(module, owner_name) if owner_name else module
            saved.append((owner, leaf, owner._parameters[leaf]))
            # The proxy stands in for the parameter for the call (as torch.func.functional_call does);
            # its gradient lands in proxy.grad, outside the optimizer's hooks on the parameter.
            owner._parameters[leaf] = proxy  # type: ignore[assignment]
        try:
            yield module
        finally:
            for owner, leaf, param in saved:
                owner._parameters[leaf] = param

    # ---- running --------------------------------------------------------------------------------------
    def _is_checkpointable(self, funcs: Sequence[Any]) -> bool:
        if self.checkpointable_layers is not None:
            return all(type(_unwrap(f)).__name__ in self.checkpointable_layers for f in funcs)
        return any(isinstance(_unwrap(f), nn.Module) and any(True for _ in _unwrap(f).parameters()) for f in funcs)

    def forward_chunk(self, chunk: int, inputs: Any) -> Any:
        """Run this stage's chunk ``chunk`` on ``inputs`` (a tensor or tuple), checkpointing as configured."""
        funcs = self.forward_funcs[chunk]

        def run(lo: int, hi: int) -> Callable[..., Any]:
            def fn(*xs: Any) -> Any:
                x: Any = xs[0] if len(xs) == 1 else xs
                for f in funcs[lo:hi]:
                    x = f(x)
                return x

            return fn

        k = self.activation_checkpoint_interval
        if k == 0:
            return run(0, len(funcs))(*(inputs if isinstance(inputs, tuple) else (inputs,)))
        ckpt = self.activation_checkpoint_func()
        x = inputs
        for lo in range(0, len(funcs), k):
            hi = min(lo + k, len(funcs))
            args = x if isinstance(x, tuple) else (x,)
            x = ckpt(run(lo, hi), *args) if self._is_checkpointable(funcs[lo:hi]) else run(lo, hi)(*args)
        return x

    def activation_checkpoint_func(self) -> Callable[..., Any]:
        """The checkpoint function in use (act-ckpt's process-wide default unless one was given)."""
        if self._ckpt_func is not None:
            return self._ckpt_func
        import act_ckpt

        return act_ckpt.checkpoint

    def forward(self, inputs: Any) -> Any:
        """The whole model when it is one stage (its chunks in order); refused with several stages."""
        if self.num_stages != 1:
            raise RuntimeError(
                f"PipelineModule.forward: this rank holds stage {self.stage_id} of {self.num_stages} only; train "
                "with engine.train_batch() (zero-all) or pipe3d.PipelineEngine, evaluate with eval_batch()"
            )
        x = inputs
        for c in range(self.num_chunks):
            x = self.forward_chunk(c, x)
        return x

    # ---- what the engine and checkpoints read ----------------------------------------------------------
    def topology(self) -> ProcessTopology:
        """The process topology."""
        return self._topo

    def mpu(self) -> PipelineParallelGrid | None:
        """The grid of process groups (None in a single process)."""
        return self._grid

    def num_pipeline_stages(self) -> int:
        """``P``."""
        return self.num_stages

    def stage_owner(self, layer_idx: int) -> int:
        """The stage holding layer ``layer_idx``."""
        for part in range(self.num_stages * self.num_chunks):
            if self.parts[part] <= layer_idx < self.parts[part + 1]:
                return part % self.num_stages
        raise ValueError(f"layer {layer_idx} is outside 0..{len(self._layer_specs) - 1}")

    def layer_to_stage(self) -> dict[int, int]:
        """Every layer index and the stage that holds it."""
        return {i: self.stage_owner(i) for i in range(len(self._layer_specs))}

    def local_layers(self) -> list[int]:
        """The global indices of this stage's layers, in order."""
        return [i for lo, hi in self.chunk_bounds for i in range(lo, hi)]

    def layer_modules(self) -> dict[int, nn.Module]:
        """This stage's layers with state (not tied ones, not plain functions), by global index."""
        return {i: self._modules[str(i)] for i in self.local_layers() if str(i) in self._modules}


def _unwrap(f: Any) -> Any:
    return f.module if isinstance(f, _TiedCall) else f


class _TiedCall:
    """One use of a tied module in a chunk (``module(x)`` or ``forward_fn(module, x)``), on proxies in a batch."""

    def __init__(self, owner: PipelineModule, key: str, forward_fn: Callable[..., Any] | None) -> None:
        self._owner = owner
        self.key = key
        self.forward_fn = forward_fn

    @property
    def module(self) -> nn.Module:
        return self._owner.tied_modules[self.key]

    def __call__(self, x: Any) -> Any:
        with self._owner._tied_swap(self.key) as module:
            return module(x) if self.forward_fn is None else partial(self.forward_fn, module)(x)
