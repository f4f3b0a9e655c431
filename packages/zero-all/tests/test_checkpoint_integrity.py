"""Checkpoint failures a user meets: an edited manifest, a bad `latest`, two crashes in a row, a full disk.

Each must end in a CheckpointError that names the file at fault (and, for a failed save, what
to do), never in a silent load or a bare OSError / UnicodeDecodeError.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from zero_all.checkpoint import layout
from zero_all.checkpoint.files import CheckpointCorruptError, CheckpointError
from zero_all.checkpoint.layout import CheckpointReader, CheckpointWriter, read_latest
from zero_testkit import run_distributed


def _save(root: Path, tag: str, value: float, size: int = 4) -> Path:
    w = CheckpointWriter(root, tag)
    w.write_rank({"x": torch.full((size,), value)}, {"value": value})
    w.write_shared("model.safetensors", {"w": torch.full((2, 2), value)})
    return w.commit(
        {
            "engine": {"global_steps": 10, "global_samples": 80, "micro_steps": 10, "skipped_steps": 0},
            "lr_scheduler": {"last_batch_iteration": 9, "base_lrs": [0.01]},
            "client_state": {"epoch": 1, "note": tag},
        }
    )


def _edit_manifest(path: Path, edit) -> None:
    body = json.loads(path.read_text())
    edit(body)
    path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")


# --- manifest integrity ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["engine"].update(global_steps=11),
        lambda m: m["lr_scheduler"].update(last_batch_iteration=0),
        lambda m: m["client_state"].update(epoch=2),
        lambda m: m.update(world_size=2),
        lambda m: m.pop("manifest_sha256"),
    ],
    ids=["global_steps", "lr_scheduler", "client_state", "world_size", "checksum-removed"],
)
def test_edited_manifest_is_detected(tmp_path: Path, edit) -> None:
    _save(tmp_path, "t", 1.0)
    manifest = tmp_path / "t" / "manifest.json"
    CheckpointReader(tmp_path, "t")  # loads before the edit
    _edit_manifest(manifest, edit)
    with pytest.raises(CheckpointCorruptError, match=f"{re.escape(str(manifest))}.*modified or corrupted"):
        CheckpointReader(tmp_path, "t")


def test_unedited_manifest_reformatted_still_loads(tmp_path: Path) -> None:
    """The checksum covers the content, not the layout: re-indenting the JSON is not an edit."""
    _save(tmp_path, "t", 1.0)
    manifest = tmp_path / "t" / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text())))
    # The manifest's own size/sha are not recorded anywhere else, so this loads.
    assert CheckpointReader(tmp_path, "t").manifest["client_state"] == {"epoch": 1, "note": "t"}


def test_world_size_that_disagrees_with_the_rank_files_is_named(tmp_path: Path) -> None:
    """Even with the checksum recomputed (a deliberate edit), a world size without its rank files is refused."""
    _save(tmp_path, "t", 1.0)
    manifest = tmp_path / "t" / "manifest.json"

    def edit(m: dict) -> None:
        m["world_size"] = 2
        m["manifest_sha256"] = layout.manifest_digest(m)

    _edit_manifest(manifest, edit)
    with pytest.raises(
        CheckpointCorruptError, match=f"{re.escape(str(manifest))}: world_size 2 does not match the rank files"
    ):
        CheckpointReader(tmp_path, "t")


def test_previous_format_loads_with_a_warning(tmp_path: Path) -> None:
    _save(tmp_path, "t", 1.0)

    def edit(m: dict) -> None:
        m["format"] = "zero-all-checkpoint/1"
        m.pop("manifest_sha256")

    _edit_manifest(tmp_path / "t" / "manifest.json", edit)
    with pytest.warns(UserWarning, match="without a manifest checksum"):
        r = CheckpointReader(tmp_path, "t")
    assert torch.equal(r.read_rank(0)[0]["x"], torch.ones(4))


# --- latest ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"gone", r"names tag 'gone', but there is no checkpoint directory .*gone; the checkpoints here are \['t'\]"),
        (b"../x", r"must be a plain name .*holds '\.\./x'"),
        (b"", r"is empty"),
        (b"\n  \n", r"is empty"),
        (b"\xff\xfe\x00binary", r"is not a text file .*starts with b'\\xff\\xfe"),
    ],
    ids=["missing-tag", "dotdot", "empty", "blank", "binary"],
)
def test_bad_latest_names_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    _save(tmp_path, "t", 1.0)
    latest = tmp_path / "latest"
    latest.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(latest))}.*{message}"):
        read_latest(tmp_path)


def test_latest_with_trailing_newline_is_fine(tmp_path: Path) -> None:
    _save(tmp_path, "t", 1.0)
    (tmp_path / "latest").write_text("t\n")  # as `echo t > latest` writes it
    assert read_latest(tmp_path) == "t"


# --- two crashes in a row -------------------------------------------------------------------------


def _crash_during(root: str, tag: str, where: str, old_name: str) -> None:
    """Forked child: save ``tag`` (the replaced copy is moved to ``.TAG.old-<old_name>``), SIGKILL at ``where``."""
    import signal

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    layout.secrets.token_hex = lambda n: old_name  # type: ignore[assignment]
    if where == "cleanup":
        # Deleting the replaced copy: one file gone, then death (rmtree is not atomic).
        def partial_rmtree(path: os.PathLike[str], ignore_errors: bool = False) -> None:
            if Path(path).name.startswith(f".{tag}.old-"):
                (Path(path) / "rank00000.safetensors").unlink()
                die()
            shutil.rmtree(path, ignore_errors=ignore_errors)

        layout.shutil.rmtree = partial_rmtree  # type: ignore[assignment]
    real_rename = os.rename
    if where == "between-renames":

        def rename_then_die(a: str, b: str) -> None:
            real_rename(a, b)  # the committed copy of the tag is moved aside ...
            die()  # ... and the new one never arrives

        os.rename = rename_then_die  # type: ignore[assignment]
    _save(Path(root), tag, 9.0)


def _run_child(*args: str) -> None:
    proc = mp.get_context("fork").Process(target=_crash_during, args=args)
    proc.start()
    proc.join(60)
    assert proc.exitcode == -9


def test_two_crashes_in_a_row_read_the_complete_copy(tmp_path: Path) -> None:
    _save(tmp_path, "t", 1.0)
    _run_child(str(tmp_path), "t", "cleanup", "00000000")  # v1 half-deleted as .t.old-00000000
    assert torch.equal(CheckpointReader(tmp_path, "t").read_rank(0)[0]["x"], torch.full((4,), 9.0))
    _run_child(str(tmp_path), "t", "between-renames", "ffffffff")  # the v9 copy moved aside, nothing in place
    left = sorted(p.name for p in tmp_path.iterdir() if ".tmp-" not in p.name)  # the never-renamed new save
    assert left == [".t.old-00000000", ".t.old-ffffffff", "latest"]
    assert read_latest(tmp_path) == "t"
    r = CheckpointReader(tmp_path, "t")
    assert r.dir.name == ".t.old-ffffffff"
    assert torch.equal(r.read_rank(0)[0]["x"], torch.full((4,), 9.0))
    # When no copy is complete the error says so, naming the copies.
    shutil.rmtree(tmp_path / ".t.old-ffffffff")
    with pytest.raises(CheckpointError, match=r"\.t\.old-00000000.*incomplete"):
        CheckpointReader(tmp_path, "t")


# --- a save that fails (full disk) ----------------------------------------------------------------


def _enospc(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_previous_intact(root: Path) -> None:
    assert read_latest(root) == "t"
    assert torch.equal(CheckpointReader(root, "t").read_rank(0)[0]["x"], torch.ones(4))
    assert not list(root.glob(".*tmp-*")), "the partial directory was removed"


@pytest.mark.parametrize("victim", ["write_tensors", "write_json_atomic"])
def test_out_of_space_while_writing_names_checkpoint_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, victim: str
) -> None:
    _save(tmp_path, "t", 1.0)
    monkeypatch.setattr(layout, victim, _enospc)
    file = "rank00000.safetensors" if victim == "write_tensors" else "rank00000.json"
    with pytest.raises(
        CheckpointError,
        match=rf"saving checkpoint 'u' in {re.escape(str(tmp_path))} failed on rank 0 writing .*{file}: No space left on device.*"
        rf"To do: free space",
    ):
        _save(tmp_path, "u", 2.0)
    _assert_previous_intact(tmp_path)
    monkeypatch.undo()
    _save(tmp_path, "u", 2.0)  # a retry once there is space works
    assert read_latest(tmp_path) == "u"


def test_out_of_space_on_the_manifest_keeps_the_same_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 fails in commit, re-saving the same tag: the committed copy must stay in place."""
    _save(tmp_path, "t", 1.0)
    real = layout.write_json_atomic

    def fail_manifest(path: Path, obj: object) -> dict:
        if path.name == "manifest.json":
            _enospc()
        return real(path, obj)

    monkeypatch.setattr(layout, "write_json_atomic", fail_manifest)
    with pytest.raises(CheckpointError, match=r"writing .*manifest\.json: No space left"):
        _save(tmp_path, "t", 2.0)
    _assert_previous_intact(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "t"]


def test_out_of_space_on_latest_says_the_checkpoint_is_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, "t", 1.0)
    monkeypatch.setattr(layout, "write_json_atomic_text", _enospc)
    with pytest.raises(CheckpointError, match=r"'u' was saved completely to .*u, but .*latest could not be updated"):
        _save(tmp_path, "u", 2.0)
    assert read_latest(tmp_path) == "t"
    assert torch.equal(CheckpointReader(tmp_path, "u").read_rank(0)[0]["x"], torch.full((4,), 2.0))


def _save_on_ranks(rank: int, world_size: int, root: str, failing_rank: int) -> str:
    """Every rank saves; ``failing_rank`` runs out of space on its shard. Returns the error each rank got."""
    from zero_all.checkpoint import layout as lay

    w = lay.CheckpointWriter(root, "u")
    if rank == failing_rank:
        lay.write_tensors = _enospc  # type: ignore[assignment]
    w.write_rank({"x": torch.full((4,), float(rank))}, {})
    if rank == 0:
        w.write_shared("model.safetensors", {"w": torch.zeros(2)})
    try:
        w.commit({})
    except CheckpointError as e:
        return str(e)
    return "no error"


def test_out_of_space_on_one_rank_fails_every_rank_and_removes_all_parts(tmp_path: Path) -> None:
    """Rank 1's disk is full: rank 0 must not hang in a barrier, and rank 0's part is removed too."""
    _save(tmp_path, "t", 1.0)
    errors = run_distributed(_save_on_ranks, 2, str(tmp_path), 1, timeout=120)
    assert "failed on rank 1 writing" in errors[1] and "rank00001.safetensors" in errors[1]
    assert "failed on rank(s) [1]" in errors[0] and "checkpoint 'u'" in errors[0]
    _assert_previous_intact(tmp_path)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 2 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the ENOSPC path is covered by the injected tests above")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk(tiny_tmpfs: Path) -> None:
    _save(tiny_tmpfs, "t", 1.0)
    free_before = shutil.disk_usage(tiny_tmpfs).free
    with pytest.raises(CheckpointError, match=r"saving checkpoint 'big' .*No space left on device.*free space"):
        _save(tiny_tmpfs, "big", 2.0, size=1024 * 1024)  # 4 MiB of float32 on a 2 MiB disk
    _assert_previous_intact(tiny_tmpfs)
    assert shutil.disk_usage(tiny_tmpfs).free == free_before, "the partial save's space was given back"
    _save(tiny_tmpfs, "small", 3.0)  # and a retry that fits succeeds
    assert read_latest(tiny_tmpfs) == "small"
