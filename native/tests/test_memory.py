"""ds_native.memory: buffers advised onto transparent huge pages, and CPUAdam's moments on them.

Whether Linux then finds free huge pages depends on the machine's fragmentation, so the tests
check what is deterministic: the madvise call succeeded (the kernel marks the mapping with the
``hg`` flag in /proc/self/smaps) and the data are untouched by it.
"""

from __future__ import annotations

import pytest
import torch

from ds_native import memory
from ds_native.optim import CPUAdam

needs_thp = pytest.mark.skipif(
    memory.thp_mode() not in ("always", "madvise") or memory.huge_page_bytes() == 0,
    reason=f"transparent huge pages are {memory.thp_mode()} on this machine",
)


@needs_thp
def test_zeros_huge_is_advised_and_zero() -> None:
    t = memory.zeros_huge((3, 4_000_000))
    assert t.shape == (3, 4_000_000) and t.dtype == torch.float32 and not t.any()
    nbytes = t.numel() * 4
    advised = memory.huge_page_advised_bytes(t)
    # Everything but the partial huge pages at the two ends.
    assert nbytes - 2 * memory.huge_page_bytes() <= advised <= nbytes
    assert memory.huge_page_advised_bytes([t, t[0]]) == advised + memory.huge_page_advised_bytes(t[0])
    # Backed is up to the machine (free huge pages), but never more than the tensor.
    backed = memory.huge_page_backed_bytes(t)
    assert 0 <= backed <= nbytes
    # The share is the same count over the tensor's bytes (read later: backing can only have grown).
    assert backed / nbytes <= memory.huge_page_share([t]) <= 1.0
    assert memory.huge_page_share([]) == 0.0
    assert memory.huge_page_advised_bytes(torch.zeros(3, 4_000_000)) == 0  # what torch gives without asking


def test_small_and_non_cpu_buffers_are_left_alone() -> None:
    assert memory.advise_huge_pages(torch.zeros(1000)) == 0
    assert memory.advise_huge_pages(torch.zeros(4_000_000, device="meta")) == 0
    small = torch.arange(10.0)
    assert memory.copy_to_huge(small) is small


@needs_thp
def test_copy_to_huge_keeps_values() -> None:
    src = torch.randn(2_000_000)
    out = memory.copy_to_huge(src)
    assert out is not src and torch.equal(out, src) and memory.huge_page_advised_bytes(out) > 0


@needs_thp
def test_cpu_adam_moments_live_on_huge_pages_also_after_a_load() -> None:
    big, small = torch.nn.Parameter(torch.randn(3_000_000)), torch.nn.Parameter(torch.randn(10))
    big.grad, small.grad = torch.randn(3_000_000), torch.randn(10)
    opt = CPUAdam([big, small], lr=1e-3)
    opt.step()
    for key in ("exp_avg", "exp_avg_sq"):
        assert memory.huge_page_advised_bytes(opt.state[big][key]) > 0
    sd = opt.state_dict()
    plain = {k: v.clone() for k, v in sd["state"][0].items()}  # ordinary torch memory, as a checkpoint loads
    assert memory.huge_page_advised_bytes(plain["exp_avg"]) == 0
    sd["state"][0] = plain
    fresh = CPUAdam([big, small], lr=1e-3)
    fresh.load_state_dict(sd)
    for key in ("exp_avg", "exp_avg_sq"):
        assert memory.huge_page_advised_bytes(fresh.state[big][key]) > 0
        assert torch.equal(fresh.state[big][key], plain[key])
