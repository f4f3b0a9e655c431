"""compressed_allreduce on 2 and 4 gloo ranks against the single-process reference, and the packing itself.

Exactness: the collective and :func:`reference_compressed_allreduce` must agree bit for bit (results
and both error buffers, every round); they share the arithmetic, so what this checks is the
communication: which chunk goes where, the byte layout of signs and scales, padding. The
arithmetic itself is checked against plain formulas below (packing against a per-bit loop, the
result against the true mean through error feedback).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onebit_cases as oc
import pytest
import torch

from onebit_comm import compressed_bytes, error_buffers, fp32_allreduce_bytes, reference_compressed_allreduce
from onebit_comm.compress import chunk_numel, pack_signs, padded_numel, unpack_signs
from zero_testkit import run_distributed


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def world(request: pytest.FixtureRequest) -> tuple[int, list[Any]]:
    w = request.param
    return w, run_distributed(oc.allreduce_rounds, w, timeout=180)


def test_matches_reference_exactly_over_rounds(world: tuple[int, list[Any]]) -> None:
    w, results = world
    for case, shape in enumerate(oc.SHAPES):
        n = int(torch.Size(shape).numel())
        errs = [error_buffers(n, w) for _ in range(w)]
        for rnd in range(oc.ROUNDS):
            inputs = [oc.make_input(r, case, rnd, shape) for r in range(w)]
            ref = reference_compressed_allreduce(inputs, [e[0] for e in errs], [e[1] for e in errs])
            for r in range(w):
                got = results[r][case][rnd]
                ctx = f"shape {shape} round {rnd} rank {r}"
                np.testing.assert_array_equal(got["result"], ref[r].numpy(), err_msg=ctx)
                np.testing.assert_array_equal(got["worker_error"], errs[r][0].numpy(), err_msg=ctx)
                np.testing.assert_array_equal(got["server_error"], errs[r][1].numpy(), err_msg=ctx)
                assert got["result"].shape == tuple(shape)


def test_bytes_sent_equal_the_formula(world: tuple[int, list[Any]]) -> None:
    w, results = world
    for case, shape in enumerate(oc.SHAPES):
        n = int(torch.Size(shape).numel())
        c = padded_numel(n, w) // w
        want = 0 if n == 0 else 2 * (w - 1) * (c // 8 + 4)
        assert compressed_bytes(n, w) == want or n == 0
        for r in range(w):
            assert [x["bytes"] for x in results[r][case]] == [want] * oc.ROUNDS, (shape, r)


def test_bytes_ratio_against_fp32() -> None:
    # 1 bit per element plus a 4-byte scale per chunk: 1/32 of the fp32 ring all-reduce, up to padding.
    for w in (2, 4, 8):
        n = 1 << 20
        assert compressed_bytes(n, w) / fp32_allreduce_bytes(n, w) == pytest.approx(1 / 32, rel=1e-3)


def test_pack_matches_a_per_bit_loop() -> None:
    x = torch.tensor([0.5, -1.0, 0.0, -0.0, 2.0, -3.0, 1e-30, -1e-30, -1.0, 1, 1, 1, 1, 1, 1, -1])
    packed = pack_signs(x)
    want = []
    for i in range(0, 16, 8):
        byte = 0
        for j in range(8):
            byte = byte * 2 + (1 if float(x[i + j]) >= 0 else 0)  # zero (and -0.0) count as positive
        want.append(byte)
    assert packed.tolist() == want
    assert unpack_signs(packed).tolist() == [1.0 if float(v) >= 0 else -1.0 for v in x]


def test_pack_round_trip_2d() -> None:
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    assert pack_signs(x).shape == (3, 8)
    assert torch.equal(unpack_signs(pack_signs(x)), torch.where(x >= 0, 1.0, -1.0))


def test_reference_arithmetic_against_formulas() -> None:
    # One round by hand: worker chunk scale = RMS of the real elements, server averages the decoded
    # copies, and every output element is +-(server scale).
    w, n = 2, 20  # padded to 32: chunk 0 has 16 real elements, chunk 1 has 4
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, generator=g) for _ in range(w)]
    errs = [error_buffers(n, w) for _ in range(w)]
    out = reference_compressed_allreduce([x.clone() for x in xs], [e[0] for e in errs], [e[1] for e in errs])[0]
    c = chunk_numel(n, w)
    dec = []
    for x in xs:
        pad = torch.cat([x, torch.zeros(padded_numel(n, w) - n)])
        parts = []
        for j in range(w):
            chunk = pad[j * c : (j + 1) * c]
            valid = min(c, n - j * c)
            s = chunk[:valid].norm() / valid**0.5
            parts.append(torch.where(chunk >= 0, s, -s))
        dec.append(torch.cat(parts)[:n])
    avg = (dec[0] + dec[1]) / 2
    for j in range(w):
        a = avg[j * c : min(n, (j + 1) * c)]
        s = a.norm() / a.numel() ** 0.5
        torch.testing.assert_close(out[j * c : min(n, (j + 1) * c)], torch.where(a >= 0, s, -s))
        # server error = compensated - decoded, zero on padding
        torch.testing.assert_close(errs[j][1][: a.numel()], a - torch.where(a >= 0, s, -s))
        assert torch.all(errs[j][1][a.numel() :] == 0)
    for r in range(w):
        torch.testing.assert_close(errs[r][0][:n], xs[r] - dec[r])
        assert torch.all(errs[r][0][n:] == 0)


def test_error_feedback_converges_to_the_mean() -> None:
    # Feeding the same inputs again and again, the running mean of the outputs approaches the true
    # mean: the errors carry what each round lost (without feedback it would stay ~100% off).
    w, n, rounds = 4, 1000, 200
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(n, generator=g) for _ in range(w)]
    errs = [error_buffers(n, w) for _ in range(w)]
    total = torch.zeros(n)
    for _ in range(rounds):
        total += reference_compressed_allreduce([x.clone() for x in xs], [e[0] for e in errs], [e[1] for e in errs])[0]
    mean = sum(xs) / w
    first = reference_compressed_allreduce(
        [x.clone() for x in xs], *zip(*[error_buffers(n, w) for _ in range(w)], strict=False)
    )[0]
    assert (first - mean).norm() / mean.norm() > 0.5
    assert (total / rounds - mean).norm() / mean.norm() < 0.05


def test_wrong_error_buffers_are_refused() -> None:
    x = torch.zeros(10)
    we, se = error_buffers(10, 2)
    from onebit_comm.allreduce import _check_buffers

    with pytest.raises(ValueError, match="worker_error must be a contiguous fp32 tensor of 16 elements"):
        _check_buffers(x, we[:8], se, 2)
    with pytest.raises(ValueError, match="server_error"):
        _check_buffers(x, we, torch.zeros(3), 2)
    with pytest.raises(TypeError, match="floating-point"):
        _check_buffers(torch.zeros(10, dtype=torch.int64), we, se, 2)


def test_single_process_is_the_identity() -> None:
    x = torch.randn(5)
    y = x.clone()
    from onebit_comm import compressed_allreduce

    compressed_allreduce(y, *error_buffers(5, 1))
    assert torch.equal(x, y)
