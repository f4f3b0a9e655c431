"""ds_native.onebit: the 1-bit kernels against plain numpy formulas, on every ISA this CPU runs.

(onebit-comm's tests/test_fused.py compares them bit for bit with the torch implementation they
replace; these check the kernels' own contract without it.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ds_native
from ds_native import onebit

pytestmark = pytest.mark.skipif(not onebit.available(), reason="built without the 1-bit kernels")
ISAS = [i for i in ("scalar", "avx2", "avx512") if ds_native._ds_native_cpu.isa_supported_by_cpu(i)]


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest):
    with ds_native.forced_isa(request.param):
        yield request.param


def test_compensate_pack_decode_against_numpy(isa: str) -> None:
    rows, row_len, numel = 3, 70_000, 3 * 70_000 - 1000  # rows of two 64 Ki pieces; padding at the end
    g = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=g)
    err = torch.zeros(rows * row_len)
    err[:numel] = torch.randn(numel, generator=g) * 0.1
    comp = err.numpy().copy()
    comp[:numel] += x.numpy()  # float32 adds, as the kernel's
    sums = onebit.compensate_(x, err, rows)
    np.testing.assert_array_equal(err.numpy(), comp)
    np.testing.assert_allclose(sums, (comp.astype(np.float64).reshape(rows, -1) ** 2).sum(1), rtol=1e-6)

    compensated = err.clone()
    scales = [0.5, 1.25, 2.0]
    valid = [row_len, row_len, row_len - 1000]
    out = torch.full((rows, row_len // 8 + 4), 7, dtype=torch.uint8)
    onebit.pack_(err, rows, out, scales, valid)
    c = compensated.view(rows, -1).numpy()
    np.testing.assert_array_equal(out[:, : row_len // 8].numpy(), np.packbits(c >= 0, axis=1))
    assert torch.all(out[:, row_len // 8 :] == 7)  # bytes past the signs untouched
    sign = np.where(c >= 0, 1.0, -1.0).astype(np.float32)
    want = c - sign * np.array(scales, dtype=np.float32)[:, None]
    want[2, valid[2] :] = 0.0
    np.testing.assert_array_equal(err.view(rows, -1).numpy(), want)

    dec = onebit.decode(out, scales, row_len, torch.empty(numel))
    np.testing.assert_array_equal(dec.numpy(), (sign * np.array(scales, dtype=np.float32)[:, None]).reshape(-1)[:numel])


def test_server_two_passes_equal_accumulate_then_pack(isa: str) -> None:
    w, c, valid = 3, 140_000, 139_993
    g = torch.Generator().manual_seed(4)
    bits = torch.randint(0, 256, (w, c // 8 + 4), dtype=torch.uint8, generator=g)
    scales = [0.25, 0.5, 0.125]
    se_a = torch.randn(c, generator=g) * 0.01
    se_a[valid:] = 0
    se_b = se_a.clone()
    out_a = torch.full((1, c // 8 + 4), 9, dtype=torch.uint8)
    out_b = out_a.clone()
    total_a = onebit.server_accumulate_(bits, scales, se_a, valid)
    compensated = se_a.numpy().copy()
    onebit.pack_(se_a, 1, out_a, [0.03], [valid])
    before = se_b.clone()
    total_b = onebit.server_sum_squares(bits, scales, se_b, valid)
    assert torch.equal(se_b, before)  # the first pass only reads
    onebit.server_pack_(bits, scales, se_b, valid, out_b, 0.03)
    assert total_a == total_b == _fixed_order_sum_squares(compensated)
    assert torch.equal(se_a, se_b)
    assert torch.equal(out_a, out_b)  # the 4 bytes past the signs untouched on both


def test_server_accumulate_against_numpy(isa: str) -> None:
    w, c, valid = 4, 140_000, 139_993
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 256, (w, c // 8), dtype=torch.uint8, generator=g)
    scales = [0.25, 0.5, 0.125, 1.0]
    se = torch.randn(c, generator=g) * 0.01
    se[valid:] = 0
    before = se.numpy().copy()
    total = onebit.server_accumulate_(bits, scales, se, valid)
    signs = np.where(np.unpackbits(bits.numpy(), axis=1) == 1, 1.0, -1.0).astype(np.float32)
    avg = signs[0] * np.float32(scales[0])
    for r in range(1, w):  # rank order, float32 adds
        avg = avg + signs[r] * np.float32(scales[r])
    avg[valid:] = 0
    np.testing.assert_array_equal(se.numpy(), before + avg)
    assert total == pytest.approx(float((se.double() ** 2).sum()), rel=1e-6)


def _fixed_order_sum_squares(x: np.ndarray) -> float:
    """The kernels' documented order, in numpy float32/float64 steps (ds_native.onebit's docstring)."""
    total = 0.0
    for p in range(0, x.size, 1 << 16):
        piece_total = 0.0
        piece = x[p : p + (1 << 16)]
        for b in range(0, piece.size, 1024):
            block = piece[b : b + 1024]
            sq = np.zeros(-(-block.size // 64) * 64, dtype=np.float32)
            sq[: block.size] = block * block  # fp32 squares; missing elements count as +0
            lanes = np.zeros(64, dtype=np.float32)
            for g in sq.reshape(-1, 64):
                lanes = lanes + g
            for w in (32, 16, 8, 4, 2, 1):
                lanes[:w] = lanes[:w] + lanes[w : 2 * w]
            piece_total += float(lanes[0])
        total += piece_total
    return total


@pytest.mark.parametrize("n", [1, 63, 1024 + 17, 200_003])
def test_sum_squares_is_the_documented_order_on_every_isa(isa: str, n: int) -> None:
    # Not just close to the float64 sum: the exact fp32/double sequence, so every ISA gives these bits.
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).numpy()
    want = _fixed_order_sum_squares(x)
    assert onebit.sum_squares(torch.from_numpy(x)) == want
    assert want == pytest.approx(float((x.astype(np.float64) ** 2).sum()), rel=1e-6)
    # The fused worker side sums the same way over what it computes (here err = 0 + x).
    assert onebit.compensate_(torch.from_numpy(x), torch.zeros(-(-n // 8) * 8), 1) == [want]


def test_sums_do_not_depend_on_threads() -> None:
    x = torch.randn(1_000_003)
    errs = [torch.zeros(2 * 500_008) for _ in range(3)]
    got = [onebit.compensate_(x, e, 2, num_threads=t) for e, t in zip(errs, (1, 2, 3), strict=True)]
    assert got[0] == got[1] == got[2]
    assert onebit.sum_squares(x, num_threads=1) == onebit.sum_squares(x, num_threads=2)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="float32"):
        onebit.compensate_(torch.zeros(8), torch.zeros(8, dtype=torch.float64), 1)
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        onebit.compensate_(torch.zeros(8, dtype=torch.float64), torch.zeros(8), 1)
    with pytest.raises(ValueError, match="contiguous"):
        onebit.decode(torch.zeros(1, 1, dtype=torch.uint8), [1.0], 8, torch.zeros(16)[::2])
    with pytest.raises(ValueError, match=r"bits must be \[1, >= 2\]"):
        onebit.decode(torch.zeros(1, 1, dtype=torch.uint8), [1.0], 16, torch.zeros(16))


@pytest.mark.parametrize("offset", [0, 8, 1])  # 64-byte aligned, 32-byte aligned, 4-byte aligned
def test_large_decode_at_any_alignment(isa: str, offset: int) -> None:
    # A tensor of several pieces per row, decoded into outputs on 64-, 32- and 4-byte boundaries.
    rows, row_len = 2, (1 << 20) + 64
    numel = rows * row_len - 24
    g = torch.Generator().manual_seed(2)
    bits = torch.randint(0, 256, (rows, row_len // 8), dtype=torch.uint8, generator=g)
    scales = [0.75, 1.5]
    out = torch.empty(numel + offset)[offset:]
    onebit.decode(bits, scales, row_len, out)
    signs = np.where(np.unpackbits(bits.numpy(), axis=1) == 1, 1.0, -1.0).astype(np.float32)
    np.testing.assert_array_equal(
        out.numpy(), (signs * np.array(scales, dtype=np.float32)[:, None]).reshape(-1)[:numel]
    )
