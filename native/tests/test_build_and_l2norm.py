"""The native pipeline end to end: C++ kernel on torch tensors, every ISA, vs torch."""

from __future__ import annotations

import pytest
import torch

import ds_native
from ds_native import _ds_native_cpu

ISAS = [isa for isa in ds_native.build_info()["cpu_isa_variants"] if _ds_native_cpu.isa_supported_by_cpu(isa)]


def _reference_norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    return torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors])).item()


def test_build_info_reports_what_was_compiled() -> None:
    info = ds_native.build_info()
    assert info["version"] == ds_native.__version__
    assert "scalar" in info["cpu_isa_variants"]
    assert info["cpu_isa_detected"] in info["cpu_isa_variants"]
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"]


def test_x86_build_has_avx2_and_avx512_variants() -> None:
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("SIMD variants are x86-64 only")
    assert {"avx2", "avx512"} <= set(ds_native.build_info()["cpu_isa_variants"])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_l2_norm_matches_torch_for_every_isa(isa: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(hash((isa, str(dtype))) % 2**31)
    sizes = [0, 1, 7, 15, 16, 17, 1023, 65537, 10**6 + 3]
    tensors = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    with ds_native.forced_isa(isa):
        assert ds_native.active_isa() == isa
        got = ds_native.multi_tensor_l2_norm(tensors)
    # fp32 squares accumulated in double: agrees with the float64 reference to ~1e-6 relative.
    assert got == pytest.approx(_reference_norm(tensors), rel=1e-6)


def test_isas_agree_with_each_other() -> None:
    tensors = [torch.randn(n) for n in (3, 4097, 300001)]
    values = {}
    for isa in ISAS:
        with ds_native.forced_isa(isa):
            values[isa] = ds_native.multi_tensor_l2_norm(tensors)
    ref = values["scalar"]
    for isa, v in values.items():
        assert v == pytest.approx(ref, rel=1e-6), isa


def test_result_is_bitwise_independent_of_thread_count() -> None:
    tensors = [torch.randn(n) for n in (5, 70000, 1_000_003)]
    one = ds_native.multi_tensor_l2_norm(tensors, num_threads=1)
    two = ds_native.multi_tensor_l2_norm(tensors, num_threads=2)
    assert one == two


def test_many_small_tensors_and_empty_list() -> None:
    tensors = [torch.randn(i % 13) for i in range(1000)]
    assert ds_native.multi_tensor_l2_norm(tensors) == pytest.approx(_reference_norm(tensors), rel=1e-6)
    assert ds_native.multi_tensor_l2_norm([]) == 0.0


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        ds_native.multi_tensor_l2_norm([torch.randn(4, 4).t()])
    with pytest.raises(TypeError, match="float64"):
        ds_native.multi_tensor_l2_norm([torch.randn(4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="unknown ISA"):
        ds_native.set_isa("sse9")


def test_compatibility_check_names_the_fix() -> None:
    ds_native.check_compatible("zero-shard", ds_native.ABI_VERSION)
    with pytest.raises(ImportError, match=r"uv pip install \./native"):
        ds_native.check_compatible("zero-shard", ds_native.ABI_VERSION + 1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_l2_norm_matches_torch() -> None:
    if not ds_native.build_info()["cuda"]:
        pytest.skip("ds-native built without CUDA")
    tensors = [
        torch.randn(n, device="cuda").to(dt) for n in (1, 7, 65537, 10**6 + 3) for dt in (torch.float32, torch.bfloat16)
    ]
    assert ds_native.multi_tensor_l2_norm(tensors) == pytest.approx(
        _reference_norm([t.cpu() for t in tensors]), rel=1e-6
    )
