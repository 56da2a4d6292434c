"""Sweeps: an experiment script trained at every combination of a few settings' values, one run each.

    python -m sft.sweep SCRIPT NAME=v1,v2,... [NAME=v1,...] [--launcher "accelerate launch --num_processes 2"]
                        [--out DIR]

e.g. `python -m sft.sweep sft/experiments/demo_smollm2_lora.py LR=1e-4,3e-4,1e-3 LORA_R=8,64` trains six
runs. SCRIPT is an experiment script's path or module name (`sft.experiments.demo_smollm2`); each NAME is
one of its settings as the scripts spell them (`LR`, `LORA_R`: the fields of `TrainConfig` in upper case).
Each value is a Python literal when it reads as one (`1e-4`, `8`, `True`, `None`, `"text"`, `(0.9, 0.99)`),
else the text itself (`cosine`). The grid is every combination, the first setting varying slowest; every
point's settings are checked before the first one trains, so a bad value anywhere stops the sweep at once.

The points train one after another, each in a process of its own (or under `--launcher`, on several
GPUs) and into a run folder of its own, named after the point: `<date>_<time>_<EXPERIMENT>_lr1e-4_lora_r8`.
A point that fails is recorded as failed and the sweep goes on; the exit code is 1 when one failed. Ctrl-C
stops the point in training as it stops a script, and ends the sweep (exit code 130).
Then DIR (default: `<RUNS_ROOT>/<date>_<time>_sweep_<EXPERIMENT>/`) receives sweep.csv and sweep.md (one
row per point: its values, run folder, status, held-out loss and task metric before and after, throughput,
peak memory, trainable parameters) and sweep.png (the loss curves of the completed points); the markdown
is printed.
"""
from __future__ import annotations

import argparse
import ast
import datetime as dt
import importlib.util
import itertools
import os
import re
import runpy
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from .analysis import load_run
from .config import TrainConfig, script_spelling, settings_from
from .errors import ConfigError, SFTError
from .plotting import plot_comparison
from .run_folder import RunFolder
from .tables import markdown_table

RUN_NAME = "sft_sweep"  # the scripts train under `if __name__ == "__main__"` only, so loading one trains nothing
SUMMARY_COLUMNS = ("eval_loss_first", "eval_loss_final", "task_metric_name", "task_metric_before",
                   "task_metric_after", "real_tokens_per_second", "peak_memory_gib")
INTERRUPTED = (130, 143)  # the exit codes of a run stopped by SIGINT / SIGTERM (sft.run.main)


@dataclass
class Outcome:
    """What became of one grid point: its status and the run folder it made (None if it made none)."""
    status: str  # "completed", "failed (exit N)", "interrupted" or "not run"
    path: Path | None = None


# ------------------------------------------------------------------------------------------- the command line


def split_values(text: str) -> list[str]:
    """The comma-separated items of `text`; a comma inside brackets or quotes belongs to its item.

    >>> split_values("1e-4,3e-4")
    ['1e-4', '3e-4']
    >>> split_values("('q_proj', 'v_proj'),all-linear")
    ["('q_proj', 'v_proj')", 'all-linear']
    """
    items, depth, quote, start = [], 0, None, 0
    for i, c in enumerate(text):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]]


def parse_value(text: str) -> Any:
    """A value as typed: the Python literal it spells, else the text itself.

    >>> parse_value("1e-4"), parse_value("8"), parse_value("True"), parse_value("None"), parse_value("cosine")
    (0.0001, 8, True, None, 'cosine')
    """
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_assignments(args: list[str]) -> dict[str, list[str]]:
    """`NAME=v1,v2,...` arguments as {NAME: [value as typed, ...]}, in the order given. Each NAME must be a
    setting, given once, with at least one value."""
    assignments: dict[str, list[str]] = {}
    for arg in args:
        name, eq, values = arg.partition("=")
        name, items = name.strip(), [v.strip() for v in split_values(values)]
        if not eq or not name or not all(items):
            raise ConfigError(f"{arg!r}: expected a setting and its values, NAME=v1,v2,... (e.g. LR=1e-4,3e-4)")
        if not settings_from({name: None}):  # it raises for a misspelt or lower-case setting, skips the rest
            raise ConfigError(f"{name}: not a setting; the settings are the fields of TrainConfig (sft/config.py) "
                              f"in upper case, e.g. LR=1e-4")
        if name in assignments:
            raise ConfigError(f"{name}: given twice; list all its values in one {name}=v1,v2,...")
        assignments[name] = items
    return assignments


def grid(assignments: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the values, the first setting varying slowest.

    >>> grid({"LR": ["1e-4", "1e-3"], "LORA_R": ["8"]})
    [{'LR': '1e-4', 'LORA_R': '8'}, {'LR': '1e-3', 'LORA_R': '8'}]
    """
    return [dict(zip(assignments, values)) for values in itertools.product(*assignments.values())]


# ------------------------------------------------------------------------------------------------ the points


def is_path(script: str) -> bool:
    """Whether SCRIPT names a file (else a module)."""
    return script.endswith(".py") or os.sep in script


def load_script(script: str) -> dict:
    """The globals of an experiment script, given as a path or a module name, run without training."""
    if is_path(script):
        if not Path(script).is_file():
            raise ConfigError(f"{script}: no such experiment script")
        return runpy.run_path(script, run_name=RUN_NAME)
    try:
        found = importlib.util.find_spec(script)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ConfigError(f"{script}: no such experiment script (a .py file, or a module such as "
                          f"sft.experiments.demo_smollm2)")
    return runpy.run_module(script, run_name=RUN_NAME)


def point_experiment(experiment: str, point: dict[str, str]) -> str:
    """The run name of a grid point: the script's EXPERIMENT and each setting with its value, file-name safe.

    >>> point_experiment("demo", {"LR": "1e-4", "LORA_R": "8", "TEMPLATE": "x/chat.jinja"})
    'demo_lr1e-4_lora_r8_templatex-chat.jinja'
    """
    safe = (re.sub(r"[^\w.+-]+", "-", text).strip("-") for text in point.values())
    return "_".join([experiment, *(f"{name.lower()}{value}" for name, value in zip(point, safe))])


def point_namespace(namespace: dict, point: dict[str, str]) -> dict:
    """The script's globals with the point's values in place and its run name as EXPERIMENT."""
    merged = {**namespace, **{name: parse_value(text) for name, text in point.items()}}
    if "EXPERIMENT" not in merged:
        raise ConfigError('EXPERIMENT: not set; the script sets EXPERIMENT = "<name>", which names the runs')
    return {**merged, "EXPERIMENT": point_experiment(str(merged["EXPERIMENT"]), point)}


def check_grid(namespace: dict, points: list[dict[str, str]]) -> list[TrainConfig]:
    """Every point's config, each validated, before anything trains."""
    configs = []
    for k, point in enumerate(points, start=1):
        try:
            configs.append(TrainConfig(**settings_from(point_namespace(namespace, point))))
        except ConfigError as e:
            raise ConfigError(f"{script_spelling(str(e))} (grid point {k} of {len(points)}: "
                              f"{' '.join(assignment_args(point))})") from None
    return configs


def assignment_args(point: dict[str, str]) -> list[str]:
    return [f"{name}={text}" for name, text in point.items()]


# ---------------------------------------------------------------------------------------------- the training


def child_command(launcher: list[str], script: str, point: dict[str, str], record: Path) -> list[str]:
    """The command that trains one point: this module's --run-one, under the launcher or this Python."""
    return [*(launcher or [sys.executable]), "-m", "sft.sweep", "--run-one", script, *assignment_args(point),
            "--record", str(record)]


def wait_for(command: list[str]) -> int:
    """Runs a child to its end; its exit code. A Ctrl-C reaches the child too: it stops at a step boundary
    and says how to resume, so it is waited for rather than killed."""
    child = subprocess.Popen(command)
    try:
        return child.wait()
    except KeyboardInterrupt:
        return child.wait()


def run_point(command: list[str], cfg: TrainConfig, record: Path) -> Outcome:
    """Trains one point; its outcome, with the run folder it made even when it failed."""
    before = run_folders(cfg)
    code = wait_for(command)
    if code == 0 and record.is_file():
        return Outcome("completed", Path(record.read_text().strip()))
    made = sorted(run_folders(cfg) - before)
    return Outcome("interrupted" if code in INTERRUPTED else f"failed (exit {code})", made[-1] if made else None)


def run_folders(cfg: TrainConfig) -> set[Path]:
    root = Path(cfg.runs_root)
    return {p for p in root.iterdir() if p.name.endswith(f"_{cfg.experiment}")} if root.is_dir() else set()


def run_grid(script: str, points: list[dict[str, str]], configs: list[TrainConfig],
             launcher: list[str]) -> list[Outcome]:
    """Trains the points one after another; an interrupted point ends the sweep (the rest are `not run`)."""
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="sft-sweep-") as records:
        for k, (point, cfg) in enumerate(zip(points, configs), start=1):
            print(f"sweep: point {k} of {len(points)}: {' '.join(assignment_args(point))}", file=sys.stderr)
            record = Path(records) / f"point-{k}.txt"
            outcomes.append(run_point(child_command(launcher, script, point, record), cfg, record))
            if outcomes[-1].status == "interrupted":
                break
    return outcomes + [Outcome("not run")] * (len(points) - len(outcomes))


def run_one(script: str, args: list[str], record: str | None) -> int:
    """One grid point, in the child process: the script's settings with the point's values, trained by
    sft.run.main (which prints a user error as one line and exits 2); the main process records the folder."""
    from .run import main as train

    point = parse_assignments(args)
    if any(len(values) != 1 for values in point.values()):
        raise ConfigError(f"--run-one: one value per setting, got {' '.join(args)}")
    folder = train(point_namespace(load_script(script), {n: v[0] for n, v in point.items()}))
    if record and int(os.environ.get("RANK", "0")) == 0:
        Path(record).write_text(f"{folder.path}\n")
    return 0


# ------------------------------------------------------------------------------------------------ the results


def point_row(point: dict[str, str], outcome: Outcome) -> dict:
    """One row of the sweep table: the point's values as typed, its run folder and status, its results."""
    run = load_run(outcome.path) if outcome.path and (outcome.path / "config.json").is_file() else None
    summary, derived = (run.summary, run.derived) if run else ({}, {})
    return {**{name.lower(): text for name, text in point.items()},
            "run": outcome.path.name if outcome.path else None, "status": outcome.status,
            **{key: summary.get(key) for key in SUMMARY_COLUMNS},
            "trainable_parameters": derived.get("trainable_parameters", derived.get("num_parameters"))}


def save_figure(fig: Figure, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # renamed when complete: a full disk leaves no torn image
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)


def write_sweep(out: Path, command: str, points: list[dict[str, str]], outcomes: list[Outcome]) -> str:
    """sweep.csv, sweep.md and (when a point completed) sweep.png in `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([point_row(p, o) for p, o in zip(points, outcomes)], dtype=object)
    table.to_csv(out / "sweep.csv", index=False)
    completed = [o.path for o in outcomes if o.status == "completed"]
    if completed:
        save_figure(plot_comparison([load_run(p) for p in completed]), out / "sweep.png")
    markdown = "\n".join([f"# Sweep\n\n`{command}`: {len(points)} points, {len(completed)} completed.\n",
                          markdown_table(table), "\n![loss curves](sweep.png)" if completed else ""]) + "\n"
    (out / "sweep.md").write_text(markdown)
    return markdown


def sweep(args: argparse.Namespace) -> int:
    """Checks every point, trains them, writes the tables; 0 when every point completed."""
    namespace = load_script(args.script)
    points = grid(parse_assignments(args.assignments))
    configs = check_grid(namespace, points)
    try:
        launcher = shlex.split(args.launcher or "")
    except ValueError as e:
        raise ConfigError(f"--launcher: {e} in {args.launcher!r}") from None
    started = dt.datetime.now()
    script = str(Path(args.script).resolve()) if is_path(args.script) else args.script  # the same from any folder
    outcomes = run_grid(script, points, configs, launcher)
    out = Path(args.out) if args.out else RunFolder.create(
        configs[0].runs_root, f"sweep_{namespace.get('EXPERIMENT', 'experiment')}", now=started).path
    command = shlex.join(["python", "-m", "sft.sweep", args.script, *args.assignments])
    print(write_sweep(out, command, points, outcomes))
    written = [str(out / name) for name in ("sweep.md", "sweep.csv", "sweep.png") if (out / name).is_file()]
    print(f"wrote {', '.join(written)}")
    statuses = {o.status for o in outcomes}
    return 0 if statuses == {"completed"} else 130 if "interrupted" in statuses else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("script", help="an experiment script: a .py file or a module name")
    parser.add_argument("assignments", nargs="+", metavar="NAME=v1,v2,...", help="a setting and its values")
    parser.add_argument("--launcher", help='the command each run starts under, e.g. "accelerate launch '
                                           '--num_processes 2" (default: this Python)')
    parser.add_argument("--out", help="where sweep.md, sweep.csv and sweep.png go (default: "
                                      "<RUNS_ROOT>/<date>_<time>_sweep_<EXPERIMENT>)")
    parser.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)  # a child: one point
    parser.add_argument("--record", help=argparse.SUPPRESS)  # the child writes its run folder's path here
    args = parser.parse_args(argv)
    try:
        return run_one(args.script, args.assignments, args.record) if args.run_one else sweep(args)
    except SFTError as e:
        print(f"error: {script_spelling(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
