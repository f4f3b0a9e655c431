"""W&B offline: the run directory holds the logged history (read from the run's .wandb record log)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from ds_monitor import MonitorMaster

wandb = pytest.importorskip(
    "wandb", reason="wandb is not installed (uv pip install -c constraints.txt './packages/ds-monitor[wandb]')"
)

_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of [crc32 u32][len u16][type u8] records
_HEADER = 7  # ":W&B" magic + u16 + version byte


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run log"
    out, parts, pos = [], [], _HEADER
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            out.append(b"".join(parts))
            parts = []
    return out


def _history(run_file: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in _records(run_file):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append(row)
    return rows


def _record_types(run_file: Path) -> list[str | None]:
    from wandb.proto import wandb_internal_pb2 as pb

    kinds = []
    for payload in _records(run_file):
        record = pb.Record()
        record.ParseFromString(payload)
        kinds.append(record.WhichOneof("record_type"))
    return kinds


def test_offline_run_holds_the_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MonitorMaster(wandb={"enabled": True, "project": "ds-monitor-test", "group": "g"}, rank=0) as monitor:
        (wb,) = monitor.monitors
        assert wb.run.project == "ds-monitor-test" and wb.run.group == "g"
        monitor.write_events([("Train/Samples/train_loss", 1.5, 8), ("Train/Samples/lr", 1e-3, 8)])
        monitor.write_events([("Train/Samples/train_loss", 1.25, 16)])
        monitor.update_config({"train_batch_size": 8})
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    # wandb's writer is a separate process (wandb-core); once in a fresh CI venv the history was not
    # in the file yet when this read it right after finish(). Give the writer a few seconds.
    deadline = time.monotonic() + 20.0
    rows = _history(run_file)
    while len(rows) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = _history(run_file)
    assert [(r["_step"], r.get("Train/Samples/train_loss"), r.get("Train/Samples/lr")) for r in rows] == [
        (8, 1.5, 1e-3),
        (16, 1.25, None),
    ], f"records in {run_file} ({run_file.stat().st_size} bytes): {_record_types(run_file)}"
