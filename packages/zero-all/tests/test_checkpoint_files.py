"""The checkpoint file layer: atomic commit, `latest` last, corruption named on load, SIGKILL-safe."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from zero_all.checkpoint.files import CheckpointCorruptError, CheckpointError
from zero_all.checkpoint.layout import CheckpointReader, CheckpointWriter, read_latest


def _save(root: Path, tag: str, value: float) -> Path:
    w = CheckpointWriter(root, tag)
    w.write_rank({"x": torch.full((4,), value)}, {"value": value})
    w.write_shared("model.safetensors", {"w": torch.full((2, 2), value)})
    return w.commit({"note": tag})


def test_round_trip_and_latest(tmp_path: Path) -> None:
    final = _save(tmp_path, "step1", 1.0)
    assert final == tmp_path / "step1" and read_latest(tmp_path) == "step1"
    r = CheckpointReader(tmp_path, "step1")
    tensors, meta = r.read_rank(0)
    assert torch.equal(tensors["x"], torch.ones(4)) and meta == {"value": 1.0}
    assert torch.equal(r.read_shared("model.safetensors")["w"], torch.ones(2, 2))
    assert r.manifest["note"] == "step1" and r.world_size == 1
    assert not list(tmp_path.glob(".*tmp*")), "no temporary directory left behind"


def test_same_tag_is_replaced(tmp_path: Path) -> None:
    _save(tmp_path, "t", 1.0)
    _save(tmp_path, "t", 2.0)
    assert torch.equal(CheckpointReader(tmp_path, "t").read_rank(0)[0]["x"], torch.full((4,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "t"]


@pytest.mark.parametrize("victim", ["rank00000.safetensors", "rank00000.json", "model.safetensors"])
def test_corrupted_file_is_named(tmp_path: Path, victim: str) -> None:
    _save(tmp_path, "t", 1.0)
    path = tmp_path / "t" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    r = CheckpointReader(tmp_path, "t")
    with pytest.raises(CheckpointCorruptError, match=victim):
        r.read_rank(0) if victim.startswith("rank") else r.read_shared(victim)


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    _save(tmp_path, "t", 1.0)
    path = tmp_path / "t" / "rank00000.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointCorruptError, match=r"rank00000.safetensors is corrupted: \d+ bytes"):
        CheckpointReader(tmp_path, "t").read_rank(0)
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointReader(tmp_path, "t").read_rank(0)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        CheckpointReader(tmp_path, "nope")


def test_bad_tags_refused(tmp_path: Path) -> None:
    for tag in ("../x", "a/b", "", ".."):
        with pytest.raises(CheckpointError, match="plain name"):
            CheckpointWriter(tmp_path, tag)


def _save_and_die(root: str, tag: str, where: str) -> None:
    """Runs in a forked child: start a save of ``tag`` and SIGKILL itself at ``where``."""
    import os
    import signal

    from zero_all.checkpoint import layout

    def die(*_: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    w = layout.CheckpointWriter(root, tag)
    if where == "mid-shard":

        def dying(path: Path, tensors: object, metadata: object = None) -> None:
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)  # half a file on disk, then death
            die()

        layout.write_tensors = dying  # type: ignore[assignment]
    w.write_rank({"x": torch.full((4,), 9.0)}, {"value": 9.0})
    real_rename = os.rename
    if where == "before-rename":
        os.rename = die  # type: ignore[assignment]
    if where == "between-renames":

        def rename_then_die(a: str, b: str) -> None:
            real_rename(a, b)  # the old copy of the tag is moved aside ...
            die()  # ... and the new one never arrives

        os.rename = rename_then_die  # type: ignore[assignment]
    w.write_shared("model.safetensors", {"w": torch.zeros(2, 2)})
    w.commit({"note": "killed"})


@pytest.mark.parametrize(("where", "tag"), [("mid-shard", "new"), ("before-rename", "old"), ("between-renames", "old")])
def test_sigkill_while_saving_keeps_previous_checkpoint(tmp_path: Path, where: str, tag: str) -> None:
    _save(tmp_path, "old", 1.0)
    # fork: the child reuses this process's imports (a fresh interpreter would re-import torch).
    proc = mp.get_context("fork").Process(target=_save_and_die, args=(str(tmp_path), tag, where))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -9
    assert read_latest(tmp_path) == "old"
    r = CheckpointReader(tmp_path, "old")
    assert torch.equal(r.read_rank(0)[0]["x"], torch.ones(4))
    assert r.manifest["note"] == "old"
    # A later save still works (leftover temporary directories are ignored) ...
    _save(tmp_path, "next", 3.0)
    assert read_latest(tmp_path) == "next"
    # ... and a completed save of the killed tag removes its leftovers.
    _save(tmp_path, tag, 4.0)
    assert not list(tmp_path.glob(f".{tag}.*"))


def test_commit_without_updating_latest(tmp_path: Path) -> None:
    _save(tmp_path, "a", 1.0)
    w = CheckpointWriter(tmp_path, "b")
    w.write_rank({"x": torch.zeros(1)}, {})
    w.commit({}, update_latest=False)
    assert read_latest(tmp_path) == "a" and (tmp_path / "b" / "manifest.json").is_file()
