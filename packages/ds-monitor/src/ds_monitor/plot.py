"""Plot recorded runs: loss, learning rate, throughput, loss scale (and grad norm, tokens/s, TFLOPS).

:func:`plot_runs` returns a matplotlib ``Figure`` (built without pyplot, so no GUI backend or global
state is touched); :func:`save_plot` writes it to PNG. Several runs are overlaid, one line each.
A metric goes to a panel by its last name component (``Train/Samples/lr`` -> ``lr``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ds_monitor.runlog import Run, RunDirError, Series, find_runs, read_run

__all__ = ["PANELS", "Panel", "load_runs", "plot_runs", "save_plot"]


def _base(name: str) -> str:
    # "Train/Samples/train_loss" and "Train_Samples_train_loss" both -> "train_samples_train_loss"
    return re.sub(r"[/ ]", "_", name).lower()


def _ends(*words: str) -> Callable[[str], bool]:
    return lambda n: any(n == w or n.endswith("_" + w) for w in words)


@dataclass(frozen=True)
class Panel:
    """A panel: its key, title, y-axis label, which metrics it takes, and whether y is log-scaled."""

    key: str
    title: str
    ylabel: str
    match: Callable[[str], bool]
    log_y: bool = False
    drawstyle: str = "default"


PANELS: tuple[Panel, ...] = (
    Panel("loss", "Loss", "loss", lambda n: "loss" in n and "loss_scale" not in n),
    Panel("lr", "Learning rate", "learning rate", _ends("lr", "learning_rate")),
    # The running average only: a per-step figure (curr_samples_per_sec) is too noisy to overlay.
    Panel(
        "throughput",
        "Throughput",
        "samples/s",
        lambda n: _ends("samples_per_sec", "samplespersec", "throughput")(n) and "curr_" not in n,
    ),
    Panel("loss_scale", "Loss scale", "loss scale", lambda n: "loss_scale" in n, log_y=True, drawstyle="steps-post"),
    Panel("grad_norm", "Gradient norm", "grad norm", _ends("grad_norm", "gradient_norm")),
    Panel("tokens", "Token throughput", "tokens/s", _ends("tokens_per_sec")),
    Panel("tflops", "Model TFLOPS", "TFLOPS", _ends("tflops")),
)
"""Panels in drawing order; a panel with no matching metric in any run is left out."""


def load_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """Every run at or below each path (see :func:`ds_monitor.runlog.find_runs`), labelled uniquely."""
    if not paths:
        raise RunDirError("no run directory given")
    runs: list[Run] = []
    labels: set[str] = set()
    for path in paths:
        root = os.path.abspath(path)
        for run_dir in find_runs(path):
            label = os.path.basename(root) if os.path.abspath(run_dir) == root else os.path.relpath(run_dir, root)
            unique, n = label, 2
            while unique in labels:  # two runs of the same name from different folders
                unique, n = f"{label} ({n})", n + 1
            labels.add(unique)
            runs.append(read_run(run_dir, label=unique))
    if not any(run.metrics for run in runs):
        where = ", ".join(str(r.path) for r in runs)
        raise RunDirError(f"the run files in {where} hold no scalar values yet")
    return runs


def x_label(names: Sequence[str]) -> str:
    """What the x values of these metrics count.

    DeepSpeed logs its ``Train/Samples/*`` metrics (CSV ``Train_Samples_*``) against the number
    of samples seen, not the optimizer step; other names are taken to be logged per step.
    """
    kinds = {"samples" if "train_samples_" in _base(n) else "step" for n in names}
    return kinds.pop() if len(kinds) == 1 else "step or samples (see legend)"


def _panel_series(run: Run, panel: Panel, taken: set[str]) -> list[Series]:
    return [s for name, s in sorted(run.metrics.items()) if name not in taken and panel.match(_base(name))]


def plot_runs(runs: Sequence[Run], metrics: Sequence[str] = (), title: str | None = None) -> Any:
    """A Figure with one panel per kind of metric found (see :data:`PANELS`), plus one per name in ``metrics``.

    Raises :class:`~ds_monitor.runlog.RunDirError` when nothing is there to plot.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        from ds_monitor.monitors import install_hint

        raise ImportError(f"plotting needs the 'matplotlib' package: {install_hint('matplotlib', 'plot')}") from exc

    panels: list[tuple[Panel, list[tuple[Run, Series]]]] = []
    for name in metrics:
        lines = [(run, run.metrics[name]) for run in runs if name in run.metrics]
        if not lines:
            known = sorted({m for run in runs for m in run.metrics})
            raise RunDirError(f"metric '{name}' is not in the run(s); found: {', '.join(known)}")
        panels.append((Panel(name, name, name.split("/")[-1], lambda n: False), lines))
    taken: dict[int, set[str]] = {id(run): set(metrics) for run in runs}
    for panel in PANELS:
        lines = []
        for run in runs:
            for series in _panel_series(run, panel, taken[id(run)]):
                lines.append((run, series))
                taken[id(run)].add(series.name)
        if lines:
            panels.append((panel, lines))
    if not panels:
        known = sorted({m for run in runs for m in run.metrics})
        raise RunDirError(
            "no loss, lr, throughput, loss scale, grad norm or TFLOPS metric in the run(s); "
            f"found: {', '.join(known)} (choose some with --metric NAME)"
        )

    ncols = 1 if len(panels) == 1 else 2
    nrows = (len(panels) + ncols - 1) // ncols
    fig = Figure(figsize=(6.0 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (panel, lines) in zip(axes, panels, strict=False):
        several = len(lines) > 1
        for run, series in lines:
            label = run.label if len(runs) > 1 else series.name
            if several and len(runs) > 1 and sum(1 for r, _ in lines if r is run) > 1:
                label = f"{run.label}: {series.name}"
            ax.plot(series.steps, series.values, label=label, linewidth=1.2, drawstyle=panel.drawstyle)
        ax.set_title(panel.title)
        ax.set_xlabel(x_label([series.name for _, series in lines]))
        ax.set_ylabel(panel.ylabel)
        if panel.log_y and all(v > 0 for _, s in lines for v in s.values):
            ax.set_yscale("log", base=2)
        ax.grid(True, alpha=0.3)
        if several:
            ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def save_plot(fig: Any, out: str | os.PathLike, dpi: int = 100) -> None:
    """Write the figure as PNG (the parent folder is created)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    parent = os.path.dirname(os.fspath(out))
    if parent:
        os.makedirs(parent, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=dpi, format="png")
