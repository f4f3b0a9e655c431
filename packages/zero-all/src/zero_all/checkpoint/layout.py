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
A save that *fails* (a full disk, a read-only directory) is agreed on by all ranks: every rank
raises a CheckpointError naming the checkpoint and the file, and rank 0 removes the partial
``.tmp-`` directory (every rank's part), so the space is freed for a retry.
(Assumes ``save_dir`` is one filesystem every rank sees, as DeepSpeed does.)

The manifest records its own sha256 (``manifest_sha256``, over its other content), so an
edited counter, scheduler state, client_state or world size is detected on load like a
corrupted tensor file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zero_all.checkpoint.files import (
    CheckpointCorruptError,
    CheckpointError,
    fsync_dir,
    manifest_digest,
    read_json,
    read_tensors,
    write_json_atomic,
    write_tensors,
)

__all__ = ["FORMAT", "CheckpointReader", "CheckpointWriter", "read_latest"]

FORMAT = "zero-all-checkpoint/2"
# /1 (zero-all 0.1 development builds) had no manifest_sha256; still read, with a warning.
_OLD_FORMATS = ("zero-all-checkpoint/1",)
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


def _failed_ranks(group: Any, failed: bool) -> list[int]:
    """Collective: the ranks (of ``group``) that report ``failed``; doubles as a barrier."""
    if not dist.is_initialized():
        return [0] if failed else []
    flags = torch.zeros(_world(group), dtype=torch.int32)
    flags[_rank(group)] = int(failed)
    if str(dist.get_backend(group)) == "nccl":  # NCCL moves device tensors only
        flags = flags.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flags, group=group)
    return [r for r, f in enumerate(flags.tolist()) if f]


def _what_to_do(err: OSError, save_dir: Path) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space on the filesystem of {save_dir} (or pass another save_dir) and save again"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {save_dir} writable by this process (or pass another save_dir) and save again"
    return "fix the cause above and save again"


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
        # The first failure on this rank: (file, exception). Writes after it are skipped; commit()
        # makes every rank agree on failures before anything is renamed.
        self.error: tuple[Path, Exception] | None = None
        if self.rank == 0:
            self._try(self.tmp, lambda: self.tmp.mkdir(parents=True))
        self._agree()
        self.files: dict[str, dict[str, Any]] = {}

    def _try(self, path: Path, write: Any) -> Any:
        """Run ``write`` (which writes ``path``) unless an earlier write failed; keep its exception.

        Any exception, not only OSError: a rank that raised here while the others went on to
        the next collective would leave them waiting; _agree() raises it on every rank instead.
        """
        if self.error is not None:
            return None
        try:
            return write()
        except Exception as e:  # noqa: BLE001 - re-raised (chained) by _agree on this rank
            self.error = (path, e)
            return None

    def _agree(self) -> None:
        """Collective: if any rank failed, rank 0 removes the partial directory and every rank raises."""
        failed = _failed_ranks(self.group, self.error is not None)
        if not failed:
            return
        if self.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
        where = f"checkpoint {self.tag!r} in {self.save_dir}"
        after = (
            f"The partial directory {self.tmp} (every rank's part) was removed; the previous checkpoint "
            f"and {self.save_dir / LATEST} are unchanged."
        )
        if self.error is not None:
            path, err = self.error
            reason = (err.strerror or str(err)) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
            todo = _what_to_do(err, self.save_dir) if isinstance(err, OSError) else "fix the cause above and save again"
            raise CheckpointError(
                f"saving {where} failed on rank {self.rank} writing {path}: {reason}. {after} To do: {todo}."
            ) from err
        raise CheckpointError(
            f"saving {where} failed on rank(s) {failed} (their errors name the file). {after} "
            f"See the error of rank {failed[0]}."
        )

    def write_rank(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """This rank's shard tensors and JSON metadata (the JSON records the tensor file's hash)."""
        stem = _rank_stem(self.rank)
        shard, meta_path = self.tmp / f"{stem}.safetensors", self.tmp / f"{stem}.json"
        record = self._try(shard, lambda: write_tensors(shard, tensors))
        self._try(meta_path, lambda: write_json_atomic(meta_path, {"meta": meta, "tensors": record}))

    def write_shared(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """A file written once (by the calling rank, normally 0), recorded in the manifest."""
        record = self._try(self.tmp / name, lambda: write_tensors(self.tmp / name, tensors))
        if record is not None:
            self.files[name] = record

    def commit(self, manifest: dict[str, Any], update_latest: bool = True) -> Path:
        """All ranks agree the writes succeeded, then rank 0 writes the manifest, renames the
        directory into place and updates ``latest``; a failure anywhere raises on every rank."""
        self._agree()
        final = self.save_dir / self.tag
        latest_error: OSError | None = None
        if self.rank == 0:
            body = self._try(self.tmp / MANIFEST, lambda: self._manifest(manifest))
            self._try(self.tmp / MANIFEST, lambda: write_json_atomic(self.tmp / MANIFEST, body))
            self._try(self.tmp, lambda: self._move_into_place(final))
            if self.error is None and update_latest:
                try:
                    write_json_atomic_text(self.save_dir / LATEST, self.tag)
                except OSError as e:
                    latest_error = e
            if self.error is None:
                # Leftovers of earlier saves of this tag (killed midway, or the copy just replaced).
                for stale in [*self.save_dir.glob(f".{self.tag}.tmp-*"), *self.save_dir.glob(f".{self.tag}.old-*")]:
                    shutil.rmtree(stale, ignore_errors=True)
        self._agree()
        if latest_error is not None:
            raise CheckpointError(
                f"checkpoint {self.tag!r} was saved completely to {final}, but {self.save_dir / LATEST} could not "
                f"be updated ({latest_error.strerror or latest_error}); it still names the previous tag. "
                f"Load this one with tag={self.tag!r}, or {_what_to_do(latest_error, self.save_dir)}."
            ) from latest_error
        return final

    def _manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The manifest body: every rank's file records, the caller's content, its own checksum."""
        files = dict(self.files)
        for r in range(self.world_size):
            stem = _rank_stem(r)
            rank_json = read_json(self.tmp / f"{stem}.json")
            files[f"{stem}.safetensors"] = rank_json["tensors"]
            files[f"{stem}.json"] = _record(self.tmp / f"{stem}.json")
        body = {"format": FORMAT, "tag": self.tag, "world_size": self.world_size, "files": files, **manifest}
        body["manifest_sha256"] = manifest_digest(body)
        return body

    def _move_into_place(self, final: Path) -> None:
        """Rename the finished temporary directory to ``final``, moving an older copy aside first."""
        fsync_dir(self.tmp)
        old = None
        if final.exists():
            old = self.save_dir / f".{self.tag}.old-{secrets.token_hex(4)}"
            os.rename(final, old)
        try:
            os.rename(self.tmp, final)
        except OSError:
            if old is not None:
                os.rename(old, final)  # put the committed copy back
            raise
        fsync_dir(self.save_dir)


def _record(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_json_atomic_text(path: Path, text: str) -> None:
    """``latest`` is plain text (DeepSpeed's format): written to a temporary name, fsynced, renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_latest(load_dir: str | os.PathLike[str]) -> str | None:
    """The tag in ``<load_dir>/latest``, or None when there is none.

    A ``latest`` that is not one tag naming an existing checkpoint raises a CheckpointError
    naming the file (an empty or binary file, a path such as ``../x``, a deleted tag).
    """
    path = Path(load_dir) / LATEST
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{path} is not a text file (it should hold one checkpoint tag, e.g. 'global_step100'): "
            f"it starts with {raw[:16]!r}; write the tag to load into it, or pass tag= to load_checkpoint"
        ) from None
    if not tag:
        raise CheckpointError(
            f"{path} is empty (it should hold one checkpoint tag, e.g. 'global_step100'); write the tag to load "
            "into it, or pass tag= to load_checkpoint"
        )
    try:
        check_tag(tag)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e} (it holds {tag[:200]!r})") from None
    if not (path.parent / tag).is_dir() and not list(path.parent.glob(f".{tag}.old-*")):
        raise CheckpointError(
            f"{path} names tag {tag!r}, but there is no checkpoint directory {path.parent / tag}; "
            f"the checkpoints here are {_tags_in(path.parent)}: pass one as tag=, or fix {path}"
        )
    return tag


def _tags_in(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file())


def _is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a manifest that verifies and every file it lists, at its size."""
    try:
        manifest = read_json(directory / MANIFEST)
        _check_manifest(directory / MANIFEST, manifest)
        return all((directory / n).stat().st_size == rec["size"] for n, rec in manifest["files"].items())
    except (CheckpointError, OSError, KeyError, TypeError, ValueError):
        return False


def _pick_old_copy(root: Path, tag: str) -> Path | None:
    """The newest complete ``.TAG.old-*`` copy, when ``TAG`` itself is missing.

    A save of an existing tag moves the committed copy aside before renaming the new one in; a
    crash between the two renames leaves only that copy. A crash *while* a replaced copy was
    being deleted leaves an incomplete one beside it: only a copy that verifies is read.
    """
    olds = [p for p in root.glob(f".{tag}.old-*") if p.is_dir()]
    complete = [p for p in olds if _is_complete(p)]
    if not complete:
        return None
    return max(complete, key=lambda p: (p / MANIFEST).stat().st_mtime_ns)


def _check_manifest(path: Path, manifest: Any) -> None:
    """Format, self-checksum and world size of a manifest; errors name ``path``."""
    if not isinstance(manifest, dict):
        raise CheckpointCorruptError(f"{path} is not a zero-all manifest (a JSON object expected)")
    fmt = manifest.get("format")
    if fmt not in (FORMAT, *_OLD_FORMATS):
        raise CheckpointError(
            f"{path}: format {fmt!r} is not {FORMAT!r} "
            "(a zero-all checkpoint; DeepSpeed's pickled *.pt checkpoints are not read)"
        )
    if fmt == FORMAT:
        recorded = manifest.get("manifest_sha256")
        if recorded != manifest_digest(manifest):
            raise CheckpointCorruptError(
                f"{path} was modified or corrupted after it was saved: its content does not match the sha256 "
                f"recorded in it (manifest_sha256{' is missing' if recorded is None else ''}). The manifest holds "
                "the engine counters, scheduler state, client_state and world size, so it is not loaded; "
                "restore it from a copy or load another checkpoint"
            )
    world = manifest.get("world_size")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointCorruptError(f"{path} has no 'files' table")
    ranks = sorted(int(n[4:9]) for n in files if re.fullmatch(r"rank\d{5}\.json", n))
    if not isinstance(world, int) or isinstance(world, bool) or world < 1 or ranks != list(range(world)):
        raise CheckpointCorruptError(
            f"{path}: world_size {world!r} does not match the rank files it lists "
            f"({len(ranks)} rank files: {[_rank_stem(r) for r in ranks][:8]}); the manifest was edited or damaged"
        )


class CheckpointReader:
    """Reads one committed checkpoint directory, verifying every file against the manifest."""

    def __init__(self, load_dir: str | os.PathLike[str], tag: str) -> None:
        self.dir = Path(load_dir) / check_tag(tag)
        if not self.dir.exists():
            # Killed between moving an older copy of this tag aside and renaming the new one in:
            # a complete older copy was committed, so read it.
            old = _pick_old_copy(Path(load_dir), tag)
            if old is not None:
                self.dir = old
            elif list(Path(load_dir).glob(f".{tag}.old-*")):
                raise CheckpointError(
                    f"no checkpoint at {self.dir}: the copies {sorted(p.name for p in Path(load_dir).glob(f'.{tag}.old-*'))} "
                    "beside it are incomplete (a save or clean-up was interrupted)"
                )
        if not (self.dir / MANIFEST).is_file():
            raise CheckpointError(f"no checkpoint at {self.dir} (missing {MANIFEST})")
        self.manifest = read_json(self.dir / MANIFEST)
        _check_manifest(self.dir / MANIFEST, self.manifest)
        if self.manifest["format"] in _OLD_FORMATS:
            warnings.warn(
                f"{self.dir / MANIFEST} is in the older format {self.manifest['format']!r} without a manifest "
                "checksum: its counters, scheduler state and client_state cannot be verified",
                stacklevel=2,
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
