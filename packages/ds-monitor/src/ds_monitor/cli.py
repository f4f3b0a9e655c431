"""The ``ds-monitor`` command.

    ds-monitor plot RUN_DIR [RUN_DIR ...] [--out loss.png] [--metric TAG ...] [--title TEXT] [--dpi N]

draws the loss / lr / throughput / loss-scale panels of one run, or several overlaid, to a PNG.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-monitor", description="Tools for ds-monitor's training logs.")
    sub = parser.add_subparsers(dest="command", required=True)
    plot = sub.add_parser(
        "plot",
        help="draw a run's loss, lr, throughput and loss scale to PNG",
        description="Read the CSV or TensorBoard logs of one or more runs and draw their metrics to a PNG "
        "(several runs are overlaid). RUN_DIR is the monitor's output_path/job_name, or a folder above "
        "several of them.",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory (or a folder of runs)")
    plot.add_argument("--out", "-o", default="loss.png", help="PNG file to write (default: loss.png)")
    plot.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="TAG",
        help="also draw this metric (TensorBoard tag or CSV file stem) in its own panel; repeatable",
    )
    plot.add_argument("--title", default=None, help="figure title")
    plot.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default: 100)")
    return parser


def _plot(args: argparse.Namespace) -> int:
    from ds_monitor.plot import load_runs, plot_runs, save_plot
    from ds_monitor.runlog import RunDirError

    try:
        runs = load_runs(args.run_dirs)
        fig = plot_runs(runs, metrics=args.metric, title=args.title)
    except RunDirError as exc:
        print(f"ds-monitor plot: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"ds-monitor plot: error: {exc}", file=sys.stderr)
        return 1
    try:
        save_plot(fig, args.out, dpi=args.dpi)
    except OSError as exc:
        print(f"ds-monitor plot: error: cannot write '{args.out}': {exc}", file=sys.stderr)
        return 1
    panels = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    print(f"wrote {args.out}: {len(runs)} run(s), panels: {', '.join(panels)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ds-monitor`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "plot":
        return _plot(args)
    raise AssertionError(args.command)  # argparse rejects unknown commands first


if __name__ == "__main__":
    sys.exit(main())
