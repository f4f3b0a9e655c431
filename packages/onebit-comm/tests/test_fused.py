"""ds-native's fused 1-bit kernels against the torch implementation they replace: bit for bit.

Each fused step (:mod:`onebit_comm.fused`) is compared with its torch counterpart in
:mod:`onebit_comm.compress` on the same inputs, results and error buffers with ``torch.equal``
(no tolerance: the kernels promise the same IEEE operations in the same order). Sizes span several
64 Ki-element pieces and end off a piece boundary; padding, bf16/fp16 inputs, signed zeros and
every ISA this CPU runs, with 1 and 2 threads. The collective on 2 gloo ranks is compared with
itself on the torch path (``fused=False``) over several rounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onebit_cases as oc
import pytest
import torch

import ds_native
from onebit_comm import PendingErrors
from onebit_comm import compress as C
from onebit_comm import fused as F
from zero_testkit import run_distributed

pytestmark = pytest.mark.skipif(not ds_native.onebit.available(), reason="ds-native without the 1-bit kernels")

ISAS = [i for i in ("scalar", "avx2", "avx512") if ds_native._ds_native_cpu.isa_supported_by_cpu(i)]


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> Any:
    with ds_native.forced_isa(request.param):
        yield request.param


def _input(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if n > 10:
        x[3], x[7] = 0.0, -0.0  # both zeros encode as +1
    return x


# (world size, elements, input dtype, threads): rows of several 64 Ki pieces, with and without padding.
WORKER_CASES = [
    (2, 200_003, torch.float32, 1),
    (3, 200_003, torch.bfloat16, 2),
    (2, 131_072 * 2, torch.float16, 1),
    (3, 131_072 * 2, torch.float32, 2),
]


@pytest.mark.parametrize(("w", "n", "dtype", "threads"), WORKER_CASES)
def test_worker_side_is_bitwise_the_torch_path(isa: str, w: int, n: int, dtype: torch.dtype, threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _worker_case(w, n, dtype)
    finally:
        torch.set_num_threads(before)


def _worker_case(w: int, n: int, dtype: torch.dtype) -> None:
    c8 = C.chunk_numel(n, w) // 8
    err_t = torch.zeros(C.padded_numel(n, w))
    err_t[:n] = _input(n, 1) * 0.1  # an error buffer from an earlier round
    err_f = err_t.clone()
    x = _input(n, 2, dtype)
    packed, scales = C.compress_chunks_(x, err_t, n, w)
    bits = torch.full((w, c8 + 4), 0xAB, dtype=torch.uint8)  # a message buffer: the scale bytes stay untouched
    got = F.compress_into_(x, err_f, C.valid_counts(n, w), bits)
    assert torch.equal(got, scales)
    assert torch.equal(bits[:, :c8], packed)
    assert torch.all(bits[:, c8:] == 0xAB)
    assert torch.equal(err_f, err_t)


@pytest.mark.parametrize("w", [2, 4])
@pytest.mark.parametrize("valid", [150_000, 70_001])  # a full chunk; a chunk mostly padding
def test_server_side_and_decode_are_bitwise_the_torch_path(isa: str, w: int, valid: int) -> None:
    c = 150_000  # 18_750 sign bytes per row
    g = torch.Generator().manual_seed(3)
    recv = torch.randint(0, 256, (w, c // 8 + 4), dtype=torch.uint8, generator=g)
    scales = torch.rand(w, generator=g) + 0.5
    se_t = torch.zeros(c)
    se_t[:valid] = torch.randn(valid, generator=g) * 0.01
    se_f = se_t.clone()
    p_t, s_t = C.server_average(recv[:, : c // 8], scales, se_t, valid)
    out = torch.zeros(1, c // 8 + 4, dtype=torch.uint8)
    s_f = F.server_into_(recv, scales, se_f, valid, out)
    assert torch.equal(s_f, s_t)
    assert torch.equal(out[0, : c // 8], p_t)
    assert torch.equal(se_f, se_t)

    numel = w * c - 12_345  # the last chunk cut short, as the tensor's end is
    want = C.decode_chunks(recv[:, : c // 8], scales, numel).clone()
    got = F.decode_into(recv, scales, c, torch.empty(numel))
    assert torch.equal(got, want)


def test_nan_propagates_as_in_torch() -> None:
    n, w = 4096, 2
    x = _input(n, 4)
    x[5] = float("nan")
    e_t, e_f = torch.zeros(n), torch.zeros(n)
    bits = torch.zeros(w, n // 16 + 4, dtype=torch.uint8)
    packed, s_t = C.compress_chunks_(x, e_t, n, w)
    s_f = F.compress_into_(x, e_f, C.valid_counts(n, w), bits)
    torch.testing.assert_close(s_f, s_t, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(bits[:, : n // 16], packed)
    torch.testing.assert_close(e_f, e_t, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(e_f).any()


def test_scale_sum_of_squares_against_float64() -> None:
    # The shared reduction itself: fp32 squares, double sums; close to an exact float64 sum.
    x = _input(1_000_003, 5)
    assert ds_native.onebit.sum_squares(x) == pytest.approx(float((x.double() ** 2).sum()), rel=1e-6)


def test_the_wrong_buffers_are_refused() -> None:
    with pytest.raises(TypeError, match="float32"):
        ds_native.onebit.pack_(
            torch.zeros(16, dtype=torch.float64), 2, torch.zeros(2, 1, dtype=torch.uint8), [1, 1], [8, 8]
        )
    with pytest.raises(ValueError, match=r"bits must be \[2, >= 1\]"):
        ds_native.onebit.pack_(torch.zeros(16), 2, torch.zeros(1, 1, dtype=torch.uint8), [1, 1], [8, 8])


def test_collective_fused_equals_torch_path_on_two_ranks() -> None:
    res = run_distributed(oc.fused_vs_torch_rounds, 2, timeout=180)
    for rank, rounds in enumerate(res):
        for i, (a, b) in enumerate(rounds):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"rank {rank} round {i} {key}")


@pytest.mark.parametrize("world", [2, 3])
def test_deferred_error_updates_are_bitwise_the_exact_path(world: int) -> None:
    res = run_distributed(oc.deferred_vs_exact_rounds, world, timeout=180)
    for rank, rounds in enumerate(res):
        for i, (exact, lazy) in enumerate(rounds):
            for key in exact:
                np.testing.assert_array_equal(lazy[key], exact[key], err_msg=f"rank {rank} round {i} {key}")


def test_deferred_kernels_settle_to_the_exact_buffers(isa: str) -> None:
    # Single process, every ISA: compress_deferred_ / server_deferred_ then settle_ == the exact kernels.
    w, n = 3, 200_003
    valid = C.valid_counts(n, w)
    c, c8 = C.chunk_numel(n, w), C.chunk_numel(n, w) // 8
    g = torch.Generator().manual_seed(9)
    err_exact = torch.zeros(C.padded_numel(n, w))
    err_exact[:n] = torch.randn(n, generator=g) * 0.1
    err_lazy = err_exact.clone()
    prev = None
    for rnd in range(3):
        x = _input(n, 10 + rnd)
        b_exact = torch.zeros(w, c8 + 4, dtype=torch.uint8)
        b_lazy = torch.zeros_like(b_exact)
        s_exact = F.compress_into_(x, err_exact, valid, b_exact)
        s_lazy = F.compress_deferred_into_(x, err_lazy, valid, b_lazy, prev)
        assert torch.equal(s_lazy, s_exact) and torch.equal(b_lazy, b_exact)
        prev = s_lazy
        settled = err_lazy.clone()
        F.settle_(settled, w, prev, valid)
        assert torch.equal(settled, err_exact)
    recv = torch.randint(0, 256, (w, c8 + 4), dtype=torch.uint8, generator=g)
    rs = torch.rand(w, generator=g) + 0.5
    se_exact = torch.zeros(c)
    se_exact[: valid[2]] = torch.randn(valid[2], generator=g) * 0.01
    se_lazy, sprev = se_exact.clone(), None
    for _ in range(3):
        o_exact = torch.zeros(1, c8 + 4, dtype=torch.uint8)
        o_lazy = torch.zeros_like(o_exact)
        t_exact = F.server_into_(recv, rs, se_exact, valid[2], o_exact)
        t_lazy = F.server_deferred_into_(recv, rs, se_lazy, valid[2], o_lazy, sprev)
        assert torch.equal(t_lazy, t_exact) and torch.equal(o_lazy, o_exact)
        sprev = t_lazy
        settled = se_lazy.clone()
        F.settle_(settled, 1, sprev, [valid[2]])
        assert torch.equal(settled, se_exact)


def test_pending_errors_of_another_world_size_are_refused() -> None:
    # Scales recorded for 2 ranks, settled in a single process (a group of 1): a clear error.
    with pytest.raises(ValueError, match="2 worker scales recorded, the group has 1 ranks"):
        PendingErrors(torch.zeros(3)).settle_(torch.zeros(16), torch.zeros(16), 10)
    PendingErrors().settle_(torch.zeros(16), torch.zeros(16), 10)  # nothing pending: a no-op
