"""zero_all.data without Hugging Face libraries: split indices, their cache, loaders, export fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from zero_all.data import (
    DataSplitError,
    RepeatingLoader,
    build_dataloader,
    parse_data_split,
    save_hf_format,
    split_indices,
)


def test_parse_data_split() -> None:
    assert parse_data_split("9,1,0") == pytest.approx([0.9, 0.1, 0.0])
    assert parse_data_split("2, 4, 4", parts=3) == pytest.approx([0.2, 0.4, 0.4])
    assert parse_data_split([1, 1]) == pytest.approx([0.5, 0.5])
    for bad in ("9,1,x", "", "0,0,0", "-1,2,0", "nan,1,0", "inf,1,1"):
        with pytest.raises(DataSplitError, match="non-negative numbers"):
            parse_data_split(bad)
    with pytest.raises(DataSplitError, match="2 parts, expected 3"):
        parse_data_split("9,1", parts=3)


@pytest.mark.parametrize(("n", "spec"), [(10, "9,1,0"), (1001, "2,4,4"), (7, "1,1,1"), (3, "1,0,0"), (0, "1,1")])
def test_split_indices_disjoint_cover_and_sizes(n: int, spec: str) -> None:
    parts = split_indices(n, spec, seed=3)
    together = np.concatenate(parts)
    assert sorted(together.tolist()) == list(range(n))  # every index exactly once
    fractions = parse_data_split(spec)
    for part, f in zip(parts, fractions, strict=True):
        assert abs(len(part) - f * n) <= 1
        assert part.dtype == np.int64


def test_split_indices_seeded_and_cached(tmp_path) -> None:
    a = split_indices(100, "8,2", seed=1, cache_dir=tmp_path, name="ds")
    b = split_indices(100, "8,2", seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = split_indices(100, "8,2", seed=2)
    assert not np.array_equal(a[0], c[0])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("ds_split") and f.endswith(".npy") for f in files)
    # A cached file is what later runs read: overwrite one and the reader sees it.
    np.save(tmp_path / files[0], np.arange(80, dtype=np.int64))
    d = split_indices(100, "8,2", seed=1, cache_dir=tmp_path, name="ds")
    assert d[0].tolist() == list(range(80)) or d[1].tolist() == list(range(80))
    # Another size, seed or split is another cache key, never the stale file.
    e = split_indices(101, "8,2", seed=1, cache_dir=tmp_path, name="ds")
    assert sum(len(x) for x in e) == 101 and len(list(tmp_path.iterdir())) == 4


def test_build_dataloader_shards_and_drop_last() -> None:
    data = TensorDataset(torch.arange(10))
    seen = []
    for rank in range(2):
        loader = build_dataloader(data, 2, rank=rank, world_size=2, seed=4)
        seen.append([int(x) for (batch,) in loader for x in batch])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(10))
    # Same seed -> same order on a rebuild; drop_last drops the short last batch.
    again = build_dataloader(data, 2, rank=0, world_size=2, seed=4)
    assert [int(x) for (b,) in again for x in b] == seen[0]
    short = build_dataloader(data, 2, rank=0, world_size=2, drop_last=True)
    assert len(short) == 2 and len(build_dataloader(data, 2, rank=0, world_size=2)) == 3
    assert again.data_sampler is again.sampler  # DeepSpeedDataLoader's attribute name
    given = DataLoader(data, batch_size=5)
    assert build_dataloader(given, 2) is given
    with pytest.raises(TypeError, match="__len__ and __getitem__"):
        build_dataloader(object(), 2)
    with pytest.raises(ValueError, match="empty"):
        build_dataloader(TensorDataset(torch.zeros(0)), 2, rank=0, world_size=1)


def test_repeating_loader_advances_epoch() -> None:
    loader = build_dataloader(TensorDataset(torch.arange(6)), 3, rank=0, world_size=1, seed=0)
    it = RepeatingLoader(loader)
    first = [next(it)[0].tolist() for _ in range(2)]
    second = [next(it)[0].tolist() for _ in range(2)]
    assert it.epoch == 1 and loader.sampler.epoch == 1
    assert sorted(x for b in first for x in b) == sorted(x for b in second for x in b) == list(range(6))
    assert first != second  # a new shuffle each pass (DeepSpeed's repeats the first order)
    with pytest.raises(RuntimeError, match="no batches"):
        next(RepeatingLoader(DataLoader(TensorDataset(torch.arange(2)), batch_size=3, drop_last=True)))


def test_save_hf_format_plain_module_writes_safetensors(tmp_path) -> None:
    from safetensors.torch import load_file

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.out = torch.nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

    model = Tied()
    out = save_hf_format(model, None, tmp_path / "m")
    state = load_file(str(out / "model.safetensors"))
    assert list(state) == ["emb.weight"]  # tied tensors written once
    assert torch.equal(state["emb.weight"], model.emb.weight.detach())
