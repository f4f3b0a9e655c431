"""CPU buffers backed by transparent huge pages, for the tensors an optimizer streams every step.

An Adam step streams params, grads and both moments once per step. Measured on the 2-core
Zen 4 VM of docs/performance.md, CPU Adam over 10M parameters ran 15-18% faster when all four
streams sat on 2 MiB pages than on 4 KiB ones (fewer TLB misses; the hardware prefetchers stop
at every 4 KiB page boundary). Linux backs memory with huge pages by itself only when
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always``; the common default is
``madvise``, where a program must ask per buffer. These helpers ask.

torch can do the same for every allocation of 2 MiB and more with the environment variable
``THP_MEM_ALLOC_ENABLE=1`` set before it starts; these helpers do it for the buffers that
matter, whatever the environment.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from pathlib import Path

import torch

from ds_native import _ds_native_cpu

_PMD_SIZE = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Below this size a buffer holds at most one whole huge page: not worth asking.
MIN_BYTES = 4 << 20


@functools.cache
def huge_page_bytes() -> int:
    """The transparent huge page size of this kernel (2 MiB on x86-64); 0 where there is none."""
    try:
        return int(_PMD_SIZE.read_text())
    except (OSError, ValueError):
        return 0


def thp_mode() -> str:
    """The system's transparent huge page mode: ``always``, ``madvise``, ``never``, or ``unavailable``."""
    try:
        text = _ENABLED.read_text()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unavailable"


def advise_huge_pages(t: torch.Tensor) -> int:
    """Ask Linux to back ``t``'s memory with huge pages; returns the bytes advised (0: none).

    Takes effect for pages not yet touched (a fresh allocation); pages already in use are
    merged later, if at all, by the kernel's khugepaged. The partial huge pages at either end
    of the buffer are left alone. A CPU tensor only; anything else is left as it is (0).
    """
    size = huge_page_bytes()
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or size == 0 or nbytes < MIN_BYTES:
        return 0
    return _ds_native_cpu.advise_huge_pages(t.data_ptr(), nbytes, size)


def empty_huge(shape: Sequence[int] | torch.Size | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.empty`` on CPU, asked to be backed by huge pages when its pages are first touched."""
    t = torch.empty(shape, dtype=dtype)
    advise_huge_pages(t)
    return t


def zeros_huge(shape: Sequence[int] | torch.Size | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.zeros`` on CPU, backed by huge pages where the system allows it."""
    return empty_huge(shape, dtype).zero_()


def copy_to_huge(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor ``t`` on huge pages (``t`` itself when it is too small to gain)."""
    if t.numel() * t.element_size() < MIN_BYTES:
        return t
    return empty_huge(t.shape, t.dtype).copy_(t)


def _smaps() -> list[tuple[int, int, dict[str, str]]]:
    """This process's mappings from /proc/self/smaps: (start, end, fields), sorted; [] where unavailable."""
    mappings: list[tuple[int, int, dict[str, str]]] = []
    try:
        smaps = open("/proc/self/smaps")  # noqa: SIM115  (closed below; read line by line, it is large)
    except OSError:
        return mappings
    with smaps:
        for line in smaps:
            head, _, rest = line.partition(" ")
            if not head.endswith(":") and "-" in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                mappings.append((lo, hi, {}))
            elif mappings:
                mappings[-1][2][head.rstrip(":")] = rest.strip()
    return mappings


def _overlaps(tensors: torch.Tensor | Sequence[torch.Tensor]) -> list[tuple[int, dict[str, str]]]:
    """(bytes of a tensor inside, smaps fields) for every mapping each of ``tensors`` overlaps."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    mappings = _smaps()
    starts = [lo for lo, _, _ in mappings]
    found = []
    for t in tensors:
        begin = t.data_ptr()
        end = begin + t.numel() * t.element_size()
        i = max(bisect.bisect_right(starts, begin) - 1, 0)
        while i < len(mappings) and mappings[i][0] < end:
            lo, hi, fields = mappings[i]
            overlap = min(hi, end) - max(lo, begin)
            if overlap > 0:
                found.append((overlap, fields))
            i += 1
    return found


def huge_page_backed_bytes(tensors: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """About how many bytes of these CPU tensors Linux backs with huge pages right now.

    From /proc/self/smaps (Linux; 0 elsewhere), read once: each overlapping mapping's
    ``AnonHugePages``, capped at the part of the tensor it holds. Exact when a tensor has its
    mappings to itself, as large allocations do; for a small tensor inside a shared heap mapping
    it may count its neighbours. Memory that several of the tensors share is counted for each.
    """
    total = 0
    for overlap, fields in _overlaps(tensors):
        kib = int(fields.get("AnonHugePages", "0 kB").split()[0])
        total += min(overlap, kib * 1024)
    return total


def huge_page_share(tensors: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """The fraction (0 to 1) of these tensors' bytes that Linux backs with huge pages right now."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    total = sum(t.numel() * t.element_size() for t in tensors)
    return huge_page_backed_bytes(tensors) / total if total else 0.0


def huge_page_advised_bytes(tensors: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Bytes of these tensors in mappings that carry the huge-page advice (smaps ``VmFlags`` ``hg``)."""
    return sum(overlap for overlap, fields in _overlaps(tensors) if "hg" in fields.get("VmFlags", "").split())


__all__ = [
    "MIN_BYTES",
    "advise_huge_pages",
    "copy_to_huge",
    "empty_huge",
    "huge_page_advised_bytes",
    "huge_page_backed_bytes",
    "huge_page_bytes",
    "huge_page_share",
    "thp_mode",
    "zeros_huge",
]
