"""The on-disk layout of a checkpoint and the crash-safe way it is written.

::

    <save_dir>/latest                  the newest complete tag (written last, atomically)
    <save_dir>/<tag>/manifest.json     format, world size, stage, engine state, client_state,
                                       and size + sha256 of every other file
    <save_dir>/<tag>/model.safetensors module state_dict (rank 0; buffers and tied names included)
    <save_dir>/<tag>/rank00000.safetensors  this rank's optimizer shard (fp32 master + state)
    <save_dir>/<tag>/rank00000.json    this rank's shard metadata (global shapes, flat offsets)

Writing: every rank writes into ``<save_dir>/.<tag>.tmp-<token>``; after a barrier rank 0
writes the manifest, renames the directory into place (replacing an older one of the same
tag) and only then rewrites ``latest``. A process killed at any point leaves the previous
checkpoint and ``latest`` untouched; the leftover ``.tmp-`` directory is never read.
(Assumes ``save_dir`` is one filesystem every rank sees, as DeepSpeed does.)
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zero_all.checkpoint.files import (
    CheckpointError,
    fsync_dir,
    read_json,
    read_tensors,
    write_json_atomic,
    write_tensors,
)

__all__ = ["FORMAT", "CheckpointReader", "CheckpointWriter", "read_latest"]

FORMAT = "zero-all-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _rank_stem(rank: int) -> str:
    return f"rank{rank:05d}"


def check_tag(tag: str) -> str:
    """A tag is one safe path component (it names a directory)."""
    tag = str(tag)
    if not _TAG_RE.match(tag) or tag in (".", ".."):
        raise CheckpointError(f"checkpoint tag {tag!r} must be a plain name (letters, digits, '_', '-', '.')")
    return tag


def _rank(group: Any) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _world(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _barrier(group: Any) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


class CheckpointWriter:
    """One save: ``write_rank`` / ``write_shared`` on the ranks, then ``commit`` on every rank."""

    def __init__(self, save_dir: str | os.PathLike[str], tag: str, group: Any = None) -> None:
        self.save_dir = Path(save_dir)
        self.tag = check_tag(tag)
        self.group = group
        self.rank = _rank(group)
        self.world_size = _world(group)
        # Rank 0 picks the temporary name; every rank must use the same one.
        token = torch.tensor([secrets.randbits(62)], dtype=torch.int64)
        if dist.is_initialized():
            if str(dist.get_backend(group)) == "nccl":  # NCCL moves device tensors only
                token = token.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(token, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        self.tmp = self.save_dir / f".{self.tag}.tmp-{int(token.item()):x}"
        if self.rank == 0:
            self.tmp.mkdir(parents=True)
        _barrier(group)
        self.files: dict[str, dict[str, Any]] = {}

    def write_rank(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """This rank's shard tensors and JSON metadata (the JSON records the tensor file's hash)."""
        stem = _rank_stem(self.rank)
        record = write_tensors(self.tmp / f"{stem}.safetensors", tensors)
        write_json_atomic(self.tmp / f"{stem}.json", {"meta": meta, "tensors": record})

    def write_shared(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """A file written once (by the calling rank, normally 0), recorded in the manifest."""
        self.files[name] = write_tensors(self.tmp / name, tensors)

    def commit(self, manifest: dict[str, Any], update_latest: bool = True) -> Path:
        """Barrier, then rank 0 writes the manifest, renames the directory into place and updates ``latest``."""
        _barrier(self.group)
        final = self.save_dir / self.tag
        if self.rank == 0:
            files = dict(self.files)
            for r in range(self.world_size):
                stem = _rank_stem(r)
                rank_json = read_json(self.tmp / f"{stem}.json")
                files[f"{stem}.safetensors"] = rank_json["tensors"]
                files[f"{stem}.json"] = _record(self.tmp / f"{stem}.json")
            body = {"format": FORMAT, "tag": self.tag, "world_size": self.world_size, "files": files, **manifest}
            write_json_atomic(self.tmp / MANIFEST, body)
            fsync_dir(self.tmp)
            old = None
            if final.exists():
                old = self.save_dir / f".{self.tag}.old-{secrets.token_hex(4)}"
                os.rename(final, old)
            os.rename(self.tmp, final)
            fsync_dir(self.save_dir)
            if update_latest:
                write_json_atomic_text(self.save_dir / LATEST, self.tag)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            # Leftovers of earlier saves of this tag that were killed midway: never read, now garbage.
            for stale in [*self.save_dir.glob(f".{self.tag}.tmp-*"), *self.save_dir.glob(f".{self.tag}.old-*")]:
                shutil.rmtree(stale, ignore_errors=True)
        _barrier(self.group)
        return final


def _record(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_json_atomic_text(path: Path, text: str) -> None:
    """``latest`` is plain text (DeepSpeed's format): written to a temporary name, fsynced, renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_latest(load_dir: str | os.PathLike[str]) -> str | None:
    """The tag in ``<load_dir>/latest``, or None when there is none."""
    path = Path(load_dir) / LATEST
    if not path.is_file():
        return None
    return check_tag(path.read_text().strip())


class CheckpointReader:
    """Reads one committed checkpoint directory, verifying every file against the manifest."""

    def __init__(self, load_dir: str | os.PathLike[str], tag: str) -> None:
        self.dir = Path(load_dir) / check_tag(tag)
        if not self.dir.exists():
            # Killed between moving an older copy of this tag aside and renaming the new one in:
            # the older copy is complete (it was committed), so read it.
            olds = sorted(Path(load_dir).glob(f".{tag}.old-*"))
            if olds:
                self.dir = olds[0]
        if not (self.dir / MANIFEST).is_file():
            raise CheckpointError(f"no checkpoint at {self.dir} (missing {MANIFEST})")
        self.manifest = read_json(self.dir / MANIFEST)
        if self.manifest.get("format") != FORMAT:
            raise CheckpointError(
                f"{self.dir / MANIFEST}: format {self.manifest.get('format')!r} is not {FORMAT!r} "
                "(a zero-all checkpoint; DeepSpeed's pickled *.pt checkpoints are not read)"
            )
        self.world_size: int = self.manifest["world_size"]

    def _expected(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["files"][name]
        except KeyError:
            raise CheckpointError(f"{self.dir / MANIFEST} does not list {name}") from None

    def read_shared(self, name: str) -> dict[str, torch.Tensor]:
        """A file written once (e.g. model.safetensors), verified."""
        return read_tensors(self.dir / name, self._expected(name))

    def has(self, name: str) -> bool:
        """Whether the manifest lists ``name``."""
        return name in self.manifest["files"]

    def read_rank(self, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One saved rank's (tensors, metadata), verified."""
        stem = _rank_stem(rank)
        meta = read_json(self.dir / f"{stem}.json", self._expected(f"{stem}.json"))["meta"]
        tensors = read_tensors(self.dir / f"{stem}.safetensors", self._expected(f"{stem}.safetensors"))
        return tensors, meta

    def read_all_ranks(self) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Every saved rank's shard, in rank order (what resharding needs)."""
        return [self.read_rank(r) for r in range(self.world_size)]
