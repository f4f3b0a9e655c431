"""Reading a recorded run back: CSV monitor files and TensorBoard event files.

A *run directory* is a folder that holds ``<metric>.csv`` files (the CSV monitor's
``output_path/job_name``) and/or ``events.out.tfevents.*`` files (TensorBoard's). Given a folder
that holds neither, :func:`find_runs` looks for run directories below it (e.g. an
``output_path`` with several jobs).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Run", "RunDirError", "Series", "find_runs", "read_run"]

EVENTS_GLOB = "events.out.tfevents.*"
_IGNORED_CSV = {"deepspeed_config.csv"}
_MAX_DEPTH = 4


class RunDirError(ValueError):
    """A run directory is missing, empty, or unreadable; the message says which and why."""


@dataclass
class Series:
    """One metric: steps ascending, one value per step (the last one written wins, as after a resume)."""

    name: str
    steps: list[int]
    values: list[float]


@dataclass
class Run:
    """The metrics of one run directory, by name (TensorBoard tag, or the CSV file's stem)."""

    path: Path
    label: str
    metrics: dict[str, Series] = field(default_factory=dict)


def _is_run_dir(path: Path) -> bool:
    return any(
        f.is_file()
        and (f.name.startswith("events.out.tfevents.") or (f.suffix == ".csv" and f.name not in _IGNORED_CSV))
        for f in path.iterdir()
    )


def find_runs(path: str | os.PathLike) -> list[Path]:
    """Run directories at or below ``path`` (itself if it is one), sorted; raises :class:`RunDirError`."""
    root = Path(path)
    if not root.exists():
        raise RunDirError(f"run directory '{root}' does not exist")
    if not root.is_dir():
        raise RunDirError(f"'{root}' is not a directory (give the folder that holds the CSV or TensorBoard files)")
    if _is_run_dir(root):
        return [root]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= _MAX_DEPTH:
            dirnames.clear()
        dirnames.sort()
        if depth and _is_run_dir(Path(dirpath)):
            found.append(Path(dirpath))
            dirnames.clear()  # a run's own sub-folders are not more runs
    if not found:
        raise RunDirError(
            f"no CSV files or TensorBoard event files (events.out.tfevents.*) found in '{root}' "
            "or its sub-folders: is this the monitor's output_path/job_name?"
        )
    return found


def _dedup(name: str, pairs: list[tuple[int, float]]) -> Series:
    last: dict[int, float] = {}
    for step, value in pairs:
        last[step] = value  # later rows replace earlier ones (a resumed run rewrote those steps)
    steps = sorted(last)
    return Series(name, steps, [last[s] for s in steps])


def _read_csv(path: Path) -> Series | None:
    pairs = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.reader(handle):
                if len(row) < 2:
                    continue
                try:
                    pairs.append((int(float(row[0])), float(row[1])))
                except ValueError:
                    continue  # the header (or a second header DeepSpeed writes on resume)
    except UnicodeDecodeError as exc:
        raise RunDirError(
            f"'{path}' is not a UTF-8 text file (byte {exc.start}: {exc.reason}): the CSV monitor writes "
            "UTF-8 'step,value' rows; move other .csv files out of the run directory"
        ) from None
    except csv.Error as exc:
        raise RunDirError(f"'{path}' is not a readable CSV file: {exc}") from None
    return _dedup(path.stem, pairs) if pairs else None


def _read_tensorboard(path: Path) -> dict[str, Series]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    except ImportError as exc:
        from ds_monitor.monitors import install_hint

        raise ImportError(
            f"reading the TensorBoard files in '{path}' needs the 'tensorboard' package: "
            + install_hint("tensorboard", "tensorboard")
        ) from exc
    acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        out[tag] = _dedup(tag, [(e.step, e.value) for e in acc.Scalars(tag)])
    return out


def read_run(path: str | os.PathLike, label: str | None = None) -> Run:
    """Every metric of one run directory. TensorBoard tags are preferred when both kinds exist.

    CSV metrics are named by file stem (``Train_Samples_lr``); a metric also in the event files
    (``Train/Samples/lr``) is read from there only.
    """
    path = Path(path)
    run = Run(path=path, label=label or path.name)
    if any(path.glob(EVENTS_GLOB)):
        run.metrics.update(_read_tensorboard(path))
    have = {name.replace("/", "_").replace(" ", "_") for name in run.metrics}
    for csv_path in sorted(path.glob("*.csv")):
        if csv_path.name in _IGNORED_CSV or csv_path.stem in have:
            continue
        series = _read_csv(csv_path)
        if series is not None:
            run.metrics[series.name] = series
    return run
