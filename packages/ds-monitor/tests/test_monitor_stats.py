"""FLOP counts (formula and FlopCounterMode) and memory figures."""

from __future__ import annotations

import pytest
import torch

from ds_monitor import count_params, dense_transformer_flops, measure_flops, memory_stats, training_step_flops
from ds_monitor.memory import format_memory_stats, memory_events


def test_dense_formula_with_recompute() -> None:
    assert dense_transformer_flops(10, 3) == 180
    assert dense_transformer_flops(10, 3, recompute_fwd_factor=1.0) == 240  # one extra forward: +2 × P × T
    with pytest.raises(ValueError, match="recompute_fwd_factor"):
        dense_transformer_flops(10, 3, recompute_fwd_factor=-1)


def test_measured_flops_of_a_linear_layer() -> None:
    batch, d_in, d_out = 8, 32, 16
    layer = torch.nn.Linear(d_in, d_out, bias=False)
    x = torch.randn(batch, d_in)
    out, flops = measure_flops(layer, x)
    assert out.shape == (batch, d_out)
    assert flops == 2 * batch * d_in * d_out  # one matmul: 2 FLOPs per multiply-add
    # forward + backward (grad of weight only: input does not require grad) = 2 matmuls
    assert training_step_flops(layer, x) == 2 * (2 * batch * d_in * d_out)
    assert layer.weight.grad is None


def test_measured_training_flops_match_6_params_tokens_for_a_linear_stack() -> None:
    # With the input requiring grad, every weight matmul has a forward and two backward matmuls:
    # exactly 6 × params × rows, the dense-transformer estimate (no attention, no bias).
    tokens, width = 16, 24
    model = torch.nn.Sequential(torch.nn.Linear(width, width, bias=False), torch.nn.Linear(width, width, bias=False))
    x = torch.randn(tokens, width, requires_grad=True)
    assert training_step_flops(model, x) == dense_transformer_flops(count_params(model), tokens)


def test_cpu_memory_stats() -> None:
    stats = memory_stats("cpu")
    assert set(stats) == {"rss_gb", "peak_rss_gb"}
    assert 0 < stats["rss_gb"] <= stats["peak_rss_gb"] + 1e-3
    big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB touched
    after = memory_stats("cpu")
    assert after["peak_rss_gb"] >= stats["rss_gb"] + 0.05
    del big
    assert "RSS=" in format_memory_stats("cpu")
    assert [name for name, _, _ in memory_events(step=3, device="cpu")] == ["Memory/rss_gb", "Memory/peak_rss_gb"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_stats() -> None:
    torch.cuda.reset_peak_memory_stats()
    x = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    stats = memory_stats("cuda")
    assert stats["allocated_gb"] >= 0.25 and stats["max_allocated_gb"] >= stats["allocated_gb"]
    del x


def test_flops_profile_per_module_and_report(tmp_path) -> None:
    from ds_monitor import FlopsProfilerConfig, profile_training_step

    batch = 4
    model = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 2, bias=False))
    x = torch.randn(batch, 8)
    out_file = tmp_path / "flops.txt"
    profile = profile_training_step(
        model, x, config=FlopsProfilerConfig(enabled=True, top_modules=1, output_file=str(out_file))
    )
    first = 2 * batch * 8 * 16 * 2  # forward + weight grad (the input needs no grad)
    second = 2 * batch * 16 * 2 * 3  # forward + weight grad + input grad
    assert profile.module_flops == {"Sequential": first + second, "Sequential.0": first, "Sequential.2": second}
    assert profile.total_flops == first + second and profile.params == 8 * 16 + 16 * 2
    assert profile.latency_s > 0 and profile.tflops > 0
    text = out_file.read_text()
    assert "depth 1: Sequential.0" in text and "Sequential.2:" in text  # top module at depth 1, then details
    assert "depth 1: Sequential.0" in profile.report(module_depth=1, top_modules=1, detailed=False)
    assert "Sequential.2:" not in profile.report(module_depth=0, detailed=True)
    assert all(p.grad is None for p in model.parameters())
