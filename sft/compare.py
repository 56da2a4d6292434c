"""Comparing runs side by side.

    python -m sft.compare runs/<a> runs/<b> [...] [--out DIR]

writes DIR/comparison.png (train and held-out loss of every run, by optimizer step and by real tokens
seen) and DIR/comparison.md (the settings that differ between the runs, and their results), and prints the
markdown. The notebook (sft/notebooks/postprocess.ipynb) shows the same figure and tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

from .analysis import Run, compare_runs, load_run
from .errors import SFTError
from .plotting import plot_comparison
from .tables import markdown_table

RESULT_COLUMNS = ["status", "train_loss_final", "eval_loss_first", "eval_loss_final", "task_metric_name",
                  "task_metric_before", "task_metric_after", "train_runtime", "real_tokens_per_second"]


def differing_settings(runs: list[Run]) -> pd.DataFrame:
    """One row per setting whose value differs between the runs, one column per run."""
    table = compare_runs(runs).set_index("name")
    settings = [c for c in table.columns if c not in RESULT_COLUMNS]
    # as written in config.json: a learning rate of 1e-4 must not print as 0.000
    return table[settings].T.rename_axis("setting").map(lambda v: v if isinstance(v, str) else json.dumps(v))


def results(runs: list[Run]) -> pd.DataFrame:
    """One row per run: its status and outcome numbers."""
    return compare_runs(runs).set_index("name")[RESULT_COLUMNS]


def comparison_markdown(runs: list[Run]) -> str:
    settings = differing_settings(runs)
    parts = ["# Comparison\n", "Runs: " + ", ".join(f"`{r.name}`" for r in runs) + "\n",
             "## Settings that differ\n",
             markdown_table(settings.reset_index()) if len(settings) else "(none: the runs share every setting)",
             "\n## Results\n", markdown_table(results(runs).reset_index()), "\n![comparison](comparison.png)\n"]
    return "\n".join(parts)


def write_comparison(run_dirs, out) -> tuple[Path, Path]:
    runs = [load_run(d) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figure, text = out / "comparison.png", out / "comparison.md"
    tmp = figure.with_name(".comparison.png.tmp")
    plot_comparison(runs).savefig(tmp, dpi=110, format="png")
    os.replace(tmp, figure)
    text.write_text(comparison_markdown(runs))
    return figure, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("--out", default="comparison", help="where comparison.png and comparison.md go")
    args = parser.parse_args(argv)
    try:
        figure, text = write_comparison(args.runs, args.out)
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text.read_text())
    print(f"wrote {figure} and {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
