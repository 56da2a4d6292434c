"""Figures of a run's metrics. Each function returns a matplotlib Figure.

Figures are built with `matplotlib.figure.Figure`, not pyplot: nothing depends on the GUI backend,
nothing accumulates in pyplot's global figure list, and a notebook shows a returned figure once
(with `%matplotlib inline`), not twice.

    python -m sft.plotting [RUN_DIR ...] [--runs-root DIR] [--out DIR]

writes a run's figures: with no RUN_DIR, the newest run under --runs-root (default: the repository's
runs/). The PNGs go into each run folder, or with --out into DIR/<run name>/ so that several runs do not
overwrite each other. Prints the paths written.
"""

import argparse
import os
import sys
from pathlib import Path

from matplotlib.figure import Figure

from .analysis import Run, latest_run, load_run
from .config import DEFAULT_RUNS_ROOT
from .errors import SFTError

X_AXES = {"step": "optimizer step", "tokens": "real tokens seen"}
FIGURE_FILES = ("loss_curves.png", "training_panels.png")


def _check_x(x: str) -> None:
    if x not in X_AXES:
        raise ValueError(f"x must be one of {sorted(X_AXES)}, got {x!r}")


def _draw_losses(ax, run: Run, x: str) -> None:
    if not run.train.empty:
        ax.plot(run.train[x], run.train["loss"], label="train loss", alpha=0.8)
    if not run.evals.empty:
        ax.plot(run.evals[x], run.evals["eval_loss"], marker="o", label="eval loss")
        for name, losses in eval_losses_by_source(run).items():  # a mixture: each dataset's own
            ax.plot(run.evals[x], losses, marker=".", linestyle="--", alpha=0.8, label=f"eval loss: {Path(name).name}")
    if run.train.empty and run.evals.empty:
        ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend()
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("loss (per supervised token)")
    ax.grid(alpha=0.3)


def eval_losses_by_source(run: Run) -> dict[str, list[float]]:
    """Each dataset's held-out loss at every eval (NaN where it was not logged), for a mixture; else empty."""
    if "eval_loss_by_source" not in run.evals:
        return {}
    records = [d if isinstance(d, dict) else {} for d in run.evals["eval_loss_by_source"]]
    names = list(dict.fromkeys(name for d in records for name in d))
    return {name: [d.get(name, float("nan")) for d in records] for name in names}


def plot_loss_curves(run: Run, x: str = "step", status: str | None = None) -> Figure:
    """Train loss and eval loss of one run on one axis, against optimizer steps or real tokens; titled with
    `status` (default: the run's own)."""
    _check_x(x)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    _draw_losses(ax, run, x)
    ax.set_title(f"{run.name} ({status or run.status})")
    return fig


def plot_training_panels(run: Run, status: str | None = None) -> Figure:
    """2x2: loss vs step, loss vs tokens, learning rate, throughput with gradient norm on a twin axis; titled
    with `status` (default: the run's own)."""
    fig = Figure(figsize=(12, 8), layout="constrained")
    (loss_step, loss_tokens), (lr, speed) = fig.subplots(2, 2)
    _draw_losses(loss_step, run, "step")
    _draw_losses(loss_tokens, run, "tokens")

    lr.plot(run.train["step"], run.train["lr"])
    lr.set_xlabel(X_AXES["step"])
    lr.set_ylabel("learning rate")
    lr.grid(alpha=0.3)

    speed.plot(run.train["step"], run.train["tokens_per_s"], color="C2", label="real tokens/s")
    speed.set_xlabel(X_AXES["step"])
    speed.set_ylabel("real tokens/s", color="C2")
    speed.grid(alpha=0.3)
    grad = speed.twinx()
    grad.plot(run.train["step"], run.train["grad_norm"], color="C3", alpha=0.7, label="grad norm")
    grad.set_ylabel("grad norm", color="C3")

    fig.suptitle(f"{run.name} ({status or run.status})")
    return fig


def plot_comparison(runs: list[Run]) -> Figure:
    """Several runs overlaid: train loss (line) and held-out loss (dashed, markers), one colour per run,
    against optimizer steps (left) and real tokens seen (right)."""
    fig = Figure(figsize=(13, 5), layout="constrained")
    for ax, x in zip(fig.subplots(1, 2), ("step", "tokens")):
        for k, run in enumerate(runs):
            colour = f"C{k % 10}"
            if not run.train.empty:
                ax.plot(run.train[x], run.train["loss"], color=colour, alpha=0.6, linewidth=1,
                        label=f"{run.name}: train")
            if not run.evals.empty:
                ax.plot(run.evals[x], run.evals["eval_loss"], color=colour, linestyle="--", marker="o",
                        label=f"{run.name}: held-out")
        ax.set_xlabel(X_AXES[x])
        ax.set_ylabel("loss (per supervised token)")
        ax.grid(alpha=0.3)
    if runs:
        fig.axes[0].legend(fontsize="small")
    return fig


def write_figures(run_dir, out_dir=None, status: str | None = None) -> list[Path]:
    """Write loss_curves.png and training_panels.png of a run into `out_dir` (default: the run folder), titled
    with `status` (default: the run's own; training passes `completed`, which it writes just after them)."""
    run = load_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run.path
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in FIGURE_FILES]
    for fig, path in zip((plot_loss_curves(run, status=status), plot_training_panels(run, status)), paths):
        tmp = path.with_name(f".{path.name}.tmp")  # renamed when complete: a full disk leaves no torn image
        try:
            fig.savefig(tmp, dpi=110, format="png")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.plotting", description="Write a run's figures.")
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run folders (default: the newest run)")
    parser.add_argument("--runs-root", default=DEFAULT_RUNS_ROOT,
                        help="where to look for the newest run (default: the repository's runs/)")
    parser.add_argument("--out", help="write into OUT/<run name>/ instead of the run folder")
    args = parser.parse_args(argv)
    try:
        run_dirs = [Path(d) for d in args.run_dirs] or [latest_run(args.runs_root)]
        for run_dir in run_dirs:
            out_dir = None if args.out is None else Path(args.out) / run_dir.resolve().name
            for path in write_figures(run_dir, out_dir):
                print(path)
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
