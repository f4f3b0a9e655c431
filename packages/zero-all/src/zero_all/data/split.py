"""DeepSpeed-Chat's ``--data_split``: proportions like ``9,1,0`` cut one dataset into parts.

The index arrays are drawn once from a seeded permutation and cached as ``.npy`` files (plain
arrays, no pickle) in a cache folder, so every rank and every later run with the same data,
seed and split reads the very same indices (DeepSpeed-Chat's ``get_raw_dataset_split_index``
does the same). Rank 0 writes; the others wait at a barrier and read.

Rounding follows DeepSpeed-Chat: part boundaries are ``round(cumulative_fraction * n)``, so the
parts are disjoint, in order, and together cover every index exactly once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch.distributed as dist

__all__ = ["DataSplitError", "parse_data_split", "split_indices"]


class DataSplitError(ValueError):
    """A ``data_split`` string that cannot be read, or that gives a part it must not."""


def parse_data_split(spec: str | list[float] | tuple[float, ...], parts: int | None = None) -> list[float]:
    """``"9,1,0"`` -> ``[0.9, 0.1, 0.0]`` (fractions that sum to 1).

    Args:
        spec: comma-separated non-negative numbers (or a sequence of them), not all zero.
        parts: the number of parts required (None: any number >= 1).

    Raises:
        DataSplitError: naming the value and what is accepted.
    """
    accepted = "comma-separated non-negative numbers, not all zero, e.g. '9,1,0' or '2,4,4'"
    if isinstance(spec, str):
        fields = [f.strip() for f in spec.split(",")]
        try:
            weights = [float(f) for f in fields]
        except ValueError:
            raise DataSplitError(f"data_split {spec!r}: not {accepted}") from None
    else:
        weights = [float(w) for w in spec]
    if parts is not None and len(weights) != parts:
        raise DataSplitError(f"data_split {spec!r}: {len(weights)} parts, expected {parts} ({accepted})")
    if not weights or any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataSplitError(f"data_split {spec!r}: not {accepted}")
    total = sum(weights)
    return [w / total for w in weights]


def _boundaries(n: int, fractions: list[float]) -> list[int]:
    cum = np.cumsum([0.0, *fractions])
    bounds = [round(float(c) * n) for c in cum]
    bounds[-1] = n  # float error must not lose the last sample
    return bounds


def split_indices(
    num_samples: int,
    data_split: str | list[float],
    *,
    seed: int = 1234,
    cache_dir: str | os.PathLike[str] | None = None,
    name: str = "data",
) -> list[np.ndarray]:
    """Indices of each part of a dataset of ``num_samples`` rows (a seeded shuffle, then cut).

    Args:
        num_samples: rows in the dataset.
        data_split: proportions, see :func:`parse_data_split`.
        seed: permutation seed (the same on every rank).
        cache_dir: where to keep the ``.npy`` index files; None: compute, do not cache.
        name: a label for the dataset (part of the cache file name, with a hash of the
            split, size and seed, so a changed dataset never reuses stale indices).

    Returns:
        One int64 array per part, disjoint, covering ``range(num_samples)``.
    """
    fractions = parse_data_split(data_split)
    if num_samples < 0:
        raise DataSplitError(f"num_samples must be >= 0, got {num_samples}")
    key = hashlib.sha1(f"{num_samples}|{seed}|{','.join(f'{f:.12g}' for f in fractions)}".encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    paths = None
    if cache_dir is not None:
        root = Path(cache_dir)
        paths = [root / f"{safe}_split{i}_{key}.npy" for i in range(len(fractions))]
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0 and not all(p.exists() for p in paths):
            root.mkdir(parents=True, exist_ok=True)
            for p, part in zip(paths, _compute(num_samples, fractions, seed), strict=True):
                tmp = p.with_name(p.name + f".tmp{os.getpid()}")
                with open(tmp, "wb") as f:
                    np.save(f, part, allow_pickle=False)
                os.replace(tmp, p)  # readers never see a half-written file
        if dist.is_initialized():
            dist.barrier()
        return [np.load(p, allow_pickle=False) for p in paths]
    return _compute(num_samples, fractions, seed)


def _compute(n: int, fractions: list[float], seed: int) -> list[np.ndarray]:
    perm = np.random.RandomState(seed).permutation(n).astype(np.int64)
    bounds = _boundaries(n, fractions)
    return [perm[bounds[i] : bounds[i + 1]] for i in range(len(fractions))]
