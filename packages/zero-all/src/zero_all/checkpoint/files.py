"""Checkpoint file primitives: safetensors and JSON written durably, read back verified.

No pickle anywhere: tensors go to safetensors, everything else to JSON. Every file is written
with fsync and its sha256 and size are recorded, so a truncated or corrupted file is detected
on load with an error that names it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "fsync_dir",
    "manifest_digest",
    "read_json",
    "read_tensors",
    "verify_file",
    "write_json_atomic",
    "write_tensors",
]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message says which file or key and why."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file does not match the size/sha256 recorded when it was written."""


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        # A half-written file (e.g. the disk filled up) would only hold space: drop it.
        path.unlink(missing_ok=True)
        raise


def manifest_digest(body: dict[str, Any]) -> str:
    """sha256 of a manifest's content, excluding its own ``manifest_sha256`` field.

    Computed over a canonical JSON form (sorted keys, no whitespace) of what the JSON file
    holds, so reading the file back and recomputing gives the same digest, and any edit of a
    value in it (counters, scheduler state, client_state, world size) changes it.
    """
    content = {k: v for k, v in body.items() if k != "manifest_sha256"}
    canonical = json.dumps(json.loads(json.dumps(content, allow_nan=True)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or new file in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write ``tensors`` as safetensors (durably); return ``{"size", "sha256"}`` for the manifest."""
    # safetensors refuses tensors that share storage and needs contiguous CPU data: copy out.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    data = st_save(flat, metadata=metadata)
    _write_bytes(path, data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_json_atomic(path: Path, obj: Any) -> dict[str, Any]:
    """Write JSON to ``path`` via a temporary file + fsync + rename; return ``{"size", "sha256"}``."""
    data = (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n").encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_bytes(tmp, data)  # removes its partial file itself on failure
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def verify_file(path: Path, expected: dict[str, Any] | None) -> bytes:
    """Read ``path`` and check it against its recorded size and sha256 (CheckpointCorruptError if not)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    data = path.read_bytes()
    if expected is not None:
        if len(data) != expected["size"]:
            raise CheckpointCorruptError(
                f"checkpoint file {path} is corrupted: {len(data)} bytes, the manifest records {expected['size']}"
            )
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CheckpointCorruptError(
                f"checkpoint file {path} is corrupted: its sha256 does not match the one recorded when it was saved"
            )
    return data


def read_tensors(path: Path, expected: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """Verified safetensors read (never unpickles)."""
    data = verify_file(path, expected)
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own error types for a malformed header
        raise CheckpointCorruptError(f"checkpoint file {path} is not a valid safetensors file: {e}") from e


def read_json(path: Path, expected: dict[str, Any] | None = None) -> Any:
    """Verified JSON read."""
    data = verify_file(path, expected)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise CheckpointCorruptError(f"checkpoint file {path} is not valid JSON: {e}") from e
