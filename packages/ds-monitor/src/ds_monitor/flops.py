"""FLOP counts for the TFLOPS figure: a formula for dense transformers, or a measurement.

* :func:`dense_transformer_flops` — the usual estimate ``6 × params × tokens`` per training step
  (2 for the forward matmuls, 4 for the backward), plus ``2 × recompute_fwd_factor`` for recomputed
  forwards under activation checkpointing. Attention's ``seq²`` term is left out, as in the estimate.
* :func:`measure_flops` — count what the ops actually do with ``torch.utils.flop_counter.FlopCounterMode``
  (matmuls, convolutions, attention; elementwise ops count 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["count_params", "dense_transformer_flops", "measure_flops", "training_step_flops"]


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


def training_step_flops(
    model: torch.nn.Module, inputs: Any, loss_fn: Callable[[Any], torch.Tensor] | None = None
) -> int:
    """Measured FLOPs of one forward + backward of ``model`` on ``inputs`` (one rank's micro-batch).

    ``loss_fn(output)`` turns the output into a scalar (default: ``output.float().sum()``).
    The gradients it leaves are cleared, so it can run before training starts.
    """

    def step() -> None:
        out = model(*inputs) if isinstance(inputs, tuple | list) else model(inputs)
        loss = loss_fn(out) if loss_fn is not None else out.float().sum()
        loss.backward()

    _, flops = measure_flops(step)
    model.zero_grad(set_to_none=True)
    return flops
