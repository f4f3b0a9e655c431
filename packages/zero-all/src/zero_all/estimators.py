"""DeepSpeed's ZeRO memory estimators: same functions, same formulas, same printed table.

``estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node, num_nodes)`` and
``..._all_cold(total_params, ...)`` print, for ZeRO-2 with and without optimizer offload, the
memory per CPU (host) and per GPU that parameters, gradients and optimizer states need; the
stage-3 twins add ``largest_layer_params`` and the ``offload_param``/``zero_init`` options.
Formulas (bytes; Φ = parameters, N = GPUs in total, n = GPUs per node, b = buffer factor):

- ZeRO-2: GPU 2Φ + 18Φ/N (2 bytes fp16 params + 2 fp16 grads + 4 fp32 grads + 4 fp32 master +
  8 Adam moments, the last four partitioned); CPU 4Φn·b. With optimizer offload: GPU 2Φ,
  CPU Φ·max(4N, 16)·b.
- ZeRO-3: see :func:`estimate_zero3_model_states_mem_needs` (largest layer 4·L bytes on GPU).

These are DeepSpeed's estimates for DeepSpeed (so a config sized with them means the same thing
here). zero-all's own stage 2 holds less on the GPU by default: its gradient partition stays in
the model's dtype and it keeps no fp32 copy of the whole gradient, 2Φ + 14Φ/N for a 16-bit model
(``ZeroShardedOptimizer.state_bytes()`` reports what a run holds). ``zero-all estimate`` prints
the same tables from the command line.
"""

from __future__ import annotations

import torch

__all__ = [
    "estimate_zero2_model_states_mem_needs",
    "estimate_zero2_model_states_mem_needs_all_cold",
    "estimate_zero2_model_states_mem_needs_all_live",
    "estimate_zero3_model_states_mem_needs",
    "estimate_zero3_model_states_mem_needs_all_cold",
    "estimate_zero3_model_states_mem_needs_all_live",
    "model_to_params",
]

_CPU = f"{'cpu':4}"  # DeepSpeed prints the offload device padded to 4 characters


def _check(num_gpus_per_node: int, num_nodes: int, total_params: int) -> None:
    for name, value in (("num_gpus_per_node", num_gpus_per_node), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if total_params < 0:
        raise ValueError(f"total_params must be >= 0, got {total_params!r}")


def estimate_zero2_model_states_mem_needs(
    total_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    additional_buffer_factor: float = 1.5,
) -> tuple[int, int]:
    """``(cpu_bytes, gpu_bytes)`` per CPU and per GPU for ZeRO-2 (DeepSpeed's formula)."""
    _check(num_gpus_per_node, num_nodes, total_params)
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def estimate_zero3_model_states_mem_needs(
    total_params: int,
    largest_layer_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    cpu_offload_params: bool = True,
    zero_init: bool = True,
    additional_buffer_factor: float = 1.5,
) -> tuple[int, int, int]:
    """``(cpu_bytes, gpu_bytes, largest_layer_bytes)`` for ZeRO-3 (DeepSpeed's formula).

    The GPU always holds the largest layer gathered in fp32-sized working memory (4·L bytes); without
    parameter offload it also holds its 2Φ/N fp16 parameter shard, and without optimizer offload the
    18Φ/N of ZeRO-2's partitioned states. ``zero_init``: the model is built partitioned, so the host
    never holds a full copy per GPU.
    """
    _check(num_gpus_per_node, num_nodes, total_params)
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            per = 18 * gpus_factor
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            per = 16 * gpus_factor
        factor = per if zero_init else max(4 * num_gpus_per_node, per)
        cpu_mem = total_params * factor * additional_buffer_factor
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        held = largest_layer_params if zero_init else total_params
        cpu_mem = held * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), largest_layer_memory


def model_to_params(model: torch.nn.Module) -> tuple[int, int]:
    """``(total_params, largest_layer_params)``: shared parameters counted once; a layer is a module's own params."""
    total = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def _header(total_params: int, num_gpus_per_node: int, num_nodes: int, largest: int | None = None) -> None:
    nodes_str = "nodes" if num_nodes > 1 else "node"
    gpus_str = "GPUs" if num_gpus_per_node > 1 else "GPU"
    sw = f"SW: Model with {int(total_params / 1e6)}M total params"
    sw += f", {int(largest / 1e6)}M largest layer params." if largest is not None else "."
    print(
        "Estimated memory needed for params, optim states and gradients for a:\n"
        f"HW: Setup with {num_nodes} {nodes_str}, {num_gpus_per_node} {gpus_str} per node.\n" + sw
    )
    print("  per CPU  |  per GPU |   Options")


def estimate_zero2_model_states_mem_needs_all_cold(
    total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1, additional_buffer_factor: float = 1.5
) -> None:
    """Print DeepSpeed's ZeRO-2 table for a hypothetical model of ``total_params`` parameters."""
    _check(num_gpus_per_node, num_nodes, total_params)
    _header(total_params, num_gpus_per_node, num_nodes)
    for cpu_offload in (True, False):
        cpu_mem, gpu_mem = estimate_zero2_model_states_mem_needs(
            total_params, num_gpus_per_node, num_nodes, cpu_offload, additional_buffer_factor
        )
        options = f"offload_optimizer={_CPU if cpu_offload else 'none'}"
        print(f" {cpu_mem / 2**30:7.2f}GB | {gpu_mem / 2**30:6.2f}GB | {options}")


def estimate_zero2_model_states_mem_needs_all_live(
    model: torch.nn.Module, num_gpus_per_node: int = 1, num_nodes: int = 1, additional_buffer_factor: float = 1.5
) -> None:
    """Print DeepSpeed's ZeRO-2 table for ``model`` (its parameter count is read from it)."""
    total, _ = model_to_params(model)
    estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node, num_nodes, additional_buffer_factor)


def estimate_zero3_model_states_mem_needs_all_cold(
    total_params: int,
    largest_layer_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    additional_buffer_factor: float = 1.5,
) -> None:
    """Print DeepSpeed's ZeRO-3 table (offload_param × offload_optimizer × zero_init) for a hypothetical model."""
    _check(num_gpus_per_node, num_nodes, total_params)
    _header(total_params, num_gpus_per_node, num_nodes, largest_layer_params)
    for cpu_offload in (True, False):
        for cpu_offload_params in (True, False):
            if not cpu_offload and cpu_offload_params:
                continue  # parameters offloaded without the optimizer: not a DeepSpeed combination
            for zero_init in (True, False):
                cpu_mem, gpu_mem, _ = estimate_zero3_model_states_mem_needs(
                    total_params,
                    largest_layer_params,
                    num_gpus_per_node,
                    num_nodes,
                    cpu_offload,
                    cpu_offload_params,
                    zero_init,
                    additional_buffer_factor,
                )
                options = (
                    f"offload_param={_CPU if cpu_offload_params else 'none'}, "
                    f"offload_optimizer={_CPU if cpu_offload else 'none'}, zero_init={1 if zero_init else 0}"
                )
                print(f" {cpu_mem / 2**30:7.2f}GB | {gpu_mem / 2**30:6.2f}GB | {options}")


def estimate_zero3_model_states_mem_needs_all_live(
    model: torch.nn.Module, num_gpus_per_node: int = 1, num_nodes: int = 1, additional_buffer_factor: float = 1.5
) -> None:
    """Print DeepSpeed's ZeRO-3 table for ``model`` (total and largest-layer counts read from it)."""
    total, largest = model_to_params(model)
    estimate_zero3_model_states_mem_needs_all_cold(
        total, largest, num_gpus_per_node, num_nodes, additional_buffer_factor
    )
