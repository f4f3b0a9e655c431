"""The data loader ``initialize(training_data=...)`` builds, and DeepSpeed's ``RepeatingLoader``.

DeepSpeed's rule, kept here: a ``DistributedSampler`` over the data-parallel ranks (shuffled,
torch's default seed 0, as DeepSpeed's loader: the config's ``seed`` does not change the data
order there either, so a script moved from DeepSpeed reads the same batches),
``batch_size`` = ``train_micro_batch_size_per_gpu``, ``drop_last`` = ``dataloader_drop_last``,
the caller's ``collate_fn``. Each rank then reads a disjoint ``1/world_size`` share of every
epoch. Call ``loader.sampler.set_epoch(epoch)`` (DeepSpeed's spelling
``loader.data_sampler.set_epoch(epoch)`` works too) each epoch for a new order;
:class:`RepeatingLoader` does it for you.

A Hugging Face ``datasets.Dataset`` is accepted as it is (it is map-style: ``len`` and
``[i]``). Its rows are dicts of Python lists unless a format is set, which the default
collate would turn into lists of per-position tensors; so when it has no format and no
``collate_fn`` is given, the loader reads it with ``with_format("torch")`` (rows of tensors,
stacked into batches). An explicit ``collate_fn`` or format is left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

__all__ = ["RepeatingLoader", "build_dataloader", "is_hf_dataset"]


def is_hf_dataset(data: Any) -> bool:
    """Whether ``data`` is a Hugging Face ``datasets.Dataset`` (checked without importing datasets)."""
    return type(data).__module__.startswith("datasets.") and hasattr(data, "with_format") and hasattr(data, "format")


def _map_style(data: Any) -> bool:
    return isinstance(data, Dataset) or (hasattr(data, "__len__") and hasattr(data, "__getitem__"))


def build_dataloader(
    dataset: Any,
    batch_size: int,
    *,
    collate_fn: Callable | None = None,
    drop_last: bool = False,
    seed: int = 0,
    shuffle: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over this rank's share of ``dataset``.

    Args:
        dataset: a map-style torch ``Dataset``, a ``datasets.Dataset``, anything with ``len``
            and ``[i]``, or a torch ``IterableDataset`` (not sharded: it must shard itself).
        batch_size: samples per batch on this rank (the micro batch).
        collate_fn: how a list of samples becomes a batch (default: torch's default_collate).
        drop_last: drop each rank's last, incomplete batch (``dataloader_drop_last``).
        seed: the sampler's shuffle seed, the same on every rank (``initialize`` uses 0, as DeepSpeed).
        shuffle: shuffle each epoch (DeepSpeed's loader does).
        rank, world_size: the data-parallel position (default: the default process group's).
    """
    if isinstance(dataset, DataLoader):
        return dataset
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if is_hf_dataset(dataset) and collate_fn is None and dataset.format.get("type") is None:
        dataset = dataset.with_format("torch")
    if isinstance(dataset, IterableDataset):
        return DataLoader(
            dataset, batch_size=batch_size, collate_fn=collate_fn, drop_last=drop_last, num_workers=num_workers
        )
    if not _map_style(dataset):
        raise TypeError(
            f"training_data must be a torch Dataset, a datasets.Dataset, a DataLoader or an object with "
            f"__len__ and __getitem__; got {type(dataset).__name__}"
        )
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    if len(dataset) == 0:
        raise ValueError("training_data is empty (0 samples)")
    # A sampler at world size 1 too: the same shuffle and seed semantics at every size.
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    loader.data_sampler = sampler  # DeepSpeedDataLoader's attribute name, for scripts that use it
    return loader


class RepeatingLoader:
    """Iterate a loader forever: at its end start it again (DeepSpeed's ``RepeatingLoader``).

    Unlike DeepSpeed's, each new pass calls ``sampler.set_epoch`` with the pass number, so a
    shuffled DistributedSampler gives a new order every pass instead of repeating the first.
    ``epoch`` says which pass is being read.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.epoch = 0
        self._set_epoch()
        self._iter: Iterator[Any] = iter(loader)

    def _set_epoch(self) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)

    def __iter__(self) -> RepeatingLoader:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._iter)
        except StopIteration:
            self.epoch += 1
            self._set_epoch()
            self._iter = iter(self.loader)
            try:
                return next(self._iter)
            except StopIteration:
                raise RuntimeError(
                    "RepeatingLoader: the loader yields no batches (empty, or drop_last with too few samples)"
                ) from None
