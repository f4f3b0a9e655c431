"""FLOP counts for the TFLOPS figure: a formula for dense transformers, or a measurement.

* :func:`dense_transformer_flops` — the usual estimate ``6 × params × tokens`` per training step
  (2 for the forward matmuls, 4 for the backward), plus ``2 × recompute_fwd_factor`` for recomputed
  forwards under activation checkpointing. Attention's ``seq²`` term is left out, as in the estimate.
* :func:`measure_flops` — count what the ops actually do with ``torch.utils.flop_counter.FlopCounterMode``
  (matmuls, convolutions, attention; elementwise ops count 0).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ds_monitor.config import FlopsProfilerConfig

__all__ = [
    "FlopsProfile",
    "count_params",
    "dense_transformer_flops",
    "measure_flops",
    "profile_training_step",
    "training_step_flops",
]


def count_params(model: torch.nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters (shared ones once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def dense_transformer_flops(num_params: int, num_tokens: int, recompute_fwd_factor: float = 0.0) -> float:
    """Training FLOPs of ``num_tokens`` tokens through a dense model of ``num_params`` parameters.

    ``(6 + 2 × recompute_fwd_factor) × num_params × num_tokens``.
    """
    if num_params < 0 or num_tokens < 0:
        raise ValueError(f"num_params and num_tokens must be >= 0, got {num_params} and {num_tokens}")
    if recompute_fwd_factor < 0:
        raise ValueError(f"recompute_fwd_factor must be >= 0, got {recompute_fwd_factor}")
    return (6.0 + 2.0 * recompute_fwd_factor) * num_params * num_tokens


def measure_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)`` under ``FlopCounterMode`` and return ``(result, flops)``.

    A backward pass run inside ``fn`` is counted too.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        result = fn(*args, **kwargs)
    return result, int(counter.get_total_flops())


def _step_fn(model: torch.nn.Module, inputs: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> Callable[[], None]:
    def step() -> None:
        out = model(*inputs) if isinstance(inputs, tuple | list) else model(inputs)
        loss = loss_fn(out) if loss_fn is not None else out.float().sum()
        loss.backward()

    return step


def training_step_flops(
    model: torch.nn.Module, inputs: Any, loss_fn: Callable[[Any], torch.Tensor] | None = None
) -> int:
    """Measured FLOPs of one forward + backward of ``model`` on ``inputs`` (one rank's micro-batch).

    ``loss_fn(output)`` turns the output into a scalar (default: ``output.float().sum()``).
    The gradients it leaves are cleared, so it can run before training starts.
    """
    _, flops = measure_flops(_step_fn(model, inputs, loss_fn))
    model.zero_grad(set_to_none=True)
    return flops


@dataclass
class FlopsProfile:
    """FLOPs of one forward + backward, in total and per module (names as ``FlopCounterMode`` gives them:
    the root module's class name, then dotted child names; depth = number of dots)."""

    total_flops: int
    params: int
    latency_s: float
    module_flops: dict[str, int] = field(default_factory=dict)
    op_flops: dict[str, int] = field(default_factory=dict)

    @property
    def tflops(self) -> float:
        """Achieved TFLOPS of the timed step (0 when it took no measurable time)."""
        return self.total_flops / self.latency_s / 1e12 if self.latency_s > 0 else 0.0

    def report(self, module_depth: int = -1, top_modules: int = 1, detailed: bool = True) -> str:
        """A text report: totals, the ``top_modules`` heaviest modules at each depth up to ``module_depth``
        (-1: every depth), and with ``detailed`` every module's FLOPs and share."""
        total = max(self.total_flops, 1)
        lines = [
            "-------------------- ds-monitor FLOPs profile (forward + backward) --------------------",
            f"params: {self.params:,}",
            f"FLOPs per step: {_human(self.total_flops)}FLOPs",
            f"step latency: {self.latency_s * 1e3:.2f} ms -> {self.tflops:.4f} TFLOPS",
            "by op: " + ", ".join(f"{op} {100 * n / total:.1f}%" for op, n in _by_value(self.op_flops)),
        ]
        depths: dict[int, list[tuple[str, int]]] = {}
        for name, flops in self.module_flops.items():
            depths.setdefault(name.count("."), []).append((name, flops))
        lines.append(f"top {top_modules} module(s) by FLOPs at each depth:")
        for depth in sorted(depths):
            if module_depth >= 0 and depth > module_depth:
                break
            top = sorted(depths[depth], key=lambda kv: -kv[1])[:top_modules]
            lines.append(f"  depth {depth}: " + ", ".join(f"{n} {_human(f)}FLOPs" for n, f in top))
        if detailed:
            lines.append("modules:")
            for name, flops in sorted(self.module_flops.items()):
                depth = name.count(".")
                if module_depth >= 0 and depth > module_depth:
                    continue
                lines.append(f"  {'  ' * depth}{name}: {_human(flops)}FLOPs ({100 * flops / total:.1f}%)")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} "


def _by_value(d: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(d.items(), key=lambda kv: -kv[1])


def profile_training_step(
    model: torch.nn.Module,
    inputs: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    config: FlopsProfilerConfig | None = None,
    print_fn: Callable[[str], None] | None = print,
) -> FlopsProfile:
    """Profile one forward + backward, as the ``flops_profiler`` section asks.

    The step is run twice: once under ``FlopCounterMode`` for the counts, once timed (the counter's
    dispatch overhead would distort the time). With a config, its report is printed through
    ``print_fn`` (or written to ``output_file``) using ``module_depth``, ``top_modules`` and
    ``detailed``. Gradients are cleared afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from ds_monitor.timers import synchronize_device

    step = _step_fn(model, inputs, loss_fn)
    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        step()
    model.zero_grad(set_to_none=True)
    synchronize_device()
    start = time.perf_counter()
    step()
    synchronize_device()
    latency = time.perf_counter() - start
    model.zero_grad(set_to_none=True)

    counts = counter.get_flop_counts()
    module_flops = {name: int(sum(ops.values())) for name, ops in counts.items() if name != "Global"}
    op_flops = {str(op): int(n) for op, n in counts.get("Global", {}).items()}
    profile = FlopsProfile(int(counter.get_total_flops()), count_params(model, False), latency, module_flops, op_flops)
    if config is not None:
        text = profile.report(config.module_depth, config.top_modules, config.detailed)
        if config.output_file:
            with open(config.output_file, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        elif print_fn is not None:
            print_fn(text)
    return profile
