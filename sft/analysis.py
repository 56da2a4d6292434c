"""Reading run folders (schema in sft/RUN_FOLDER.md) into pandas, and comparing runs.

Everything here only reads. A run that is still running, or that failed, loads with whatever it has
written so far: missing files give empty tables or dicts, a torn last line of metrics.jsonl is skipped.
"""

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import DEFAULT_RUNS_ROOT
from .errors import DataError
from .run_folder import lock_is_held, read_config

TRAIN_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "tokens_per_s", "elapsed_s"]
EVAL_COLUMNS = ["step", "epoch", "tokens", "eval_loss", "task_metric", "task_metric_name", "elapsed_s"]
SAMPLE_COLUMNS = ["stage", "index", "messages", "prompt", "response", "reference", "decoding"]
SIDE_BY_SIDE_COLUMNS = ["index", "prompt", "reference", "response_before", "response_after"]


@dataclass
class Run:
    path: Path
    name: str
    config: dict
    derived: dict
    env: dict
    summary: dict
    train: pd.DataFrame
    evals: pd.DataFrame
    samples: pd.DataFrame
    data_stats: dict | None

    @property
    def status(self) -> str:
        """The summary's status, except that a run that says `running` while no process holds its lock
        (it was killed, or its machine went down) is `stale`: it will never complete by itself."""
        status = self.summary.get("status", "unknown")
        return "stale" if status == "running" and not lock_is_held(self.path) else status


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def _read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file; a malformed line (a crash can tear the last one) is skipped with a warning."""
    if not path.exists():
        return []
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{lineno}: skipping malformed line {line[:80]!r}", stacklevel=3)
            continue
        if not isinstance(record, dict):
            warnings.warn(f"{path}:{lineno}: skipping a line that is not a JSON object", stacklevel=3)
            continue
        records.append(record)
    return records


def read_metrics(path, kind: str | None = None) -> list[dict]:
    """The records of a run folder's metrics.jsonl in order, or those of one `kind` ("train" or "eval"); a torn
    last line is skipped with a warning."""
    return [r for r in _read_jsonl(Path(path) / "metrics.jsonl") if kind is None or r.get("kind") == kind]


def read_samples(path) -> list[dict]:
    """The records of a run folder's samples.jsonl in order (see sft/RUN_FOLDER.md)."""
    return _read_jsonl(Path(path) / "samples.jsonl")


def _frame(records: list[dict], columns: list[str]) -> pd.DataFrame:
    """A DataFrame that has at least `columns`, so code reading an empty run finds the columns it expects."""
    frame = pd.DataFrame.from_records(records)
    for column in columns:
        if column not in frame.columns:
            frame[column] = pd.Series(dtype="float64")
    return frame


def load_run(path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such run folder")
    config_file = path / "config.json"
    try:
        config = read_config(path)
    except json.JSONDecodeError as e:
        raise DataError(f"{config_file}: not valid JSON ({e})") from e
    if config is None:
        raise DataError(f"{path}: not a run folder (no config.json)")
    if not isinstance(config, dict) or "config" not in config:
        raise DataError(f"{config_file}: has no 'config' key (see sft/RUN_FOLDER.md)")

    metrics = read_metrics(path)
    train = [{k: v for k, v in m.items() if k != "kind"} for m in metrics if m.get("kind") == "train"]
    evals = [{k: v for k, v in m.items() if k != "kind"} for m in metrics if m.get("kind") == "eval"]
    return Run(
        path=path,
        name=path.name,
        config=config["config"],
        derived=config.get("derived") or {},
        env=_read_json(path / "env.json") or {},
        summary=_read_json(path / "summary.json") or {},
        train=_frame(train, TRAIN_COLUMNS),
        evals=_frame(evals, EVAL_COLUMNS),
        samples=_frame(read_samples(path), SAMPLE_COLUMNS),
        data_stats=_read_json(path / "data_stats.json"),
    )


def find_runs(root=DEFAULT_RUNS_ROOT) -> list[Path]:
    """Run folders (those with a config.json) directly under `root`, oldest first: names start with a timestamp."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if (p / "config.json").is_file()), key=lambda p: p.name)


def latest_run(root=DEFAULT_RUNS_ROOT) -> Path:
    runs = find_runs(root)
    if not runs:
        raise DataError(f"no run folders (folders with a config.json) under {root}")
    return runs[-1]


def resolve_runs(run_dirs=(), runs_root=DEFAULT_RUNS_ROOT, environ=None) -> list[Path]:
    """The run folders to analyse, for notebooks and scripts.

    The environment variable SFT_RUNS (folders separated by os.pathsep) overrides `run_dirs`, and
    SFT_RUNS_ROOT overrides `runs_root`. With no folders, the newest run under the runs root. An
    entry that is not an existing folder is taken as the name of a run under the runs root; so is the
    last part of a path that does not exist from here ("runs/<name>" given from the repository root to
    a notebook that runs in its own folder).
    """
    environ = os.environ if environ is None else environ
    runs_root = Path(environ.get("SFT_RUNS_ROOT") or runs_root)
    if environ.get("SFT_RUNS"):
        run_dirs = [d for d in environ["SFT_RUNS"].split(os.pathsep) if d]
    if not run_dirs:
        return [latest_run(runs_root)]
    return [next((c for c in (Path(d), runs_root / d, runs_root / Path(d).name) if c.is_dir()), runs_root / d)
            for d in run_dirs]


def flatten(settings: dict, prefix: str = "") -> dict:
    """Nested settings as one level with dotted keys: {"lora": {"r": 8}} -> {"lora.r": 8}."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_table(run: Run) -> pd.DataFrame:
    """Every resolved setting and derived value of a run, one row each, indexed by (section, key)."""
    rows = [("config", k, v) for k, v in flatten(run.config).items()]
    rows += [("derived", k, v) for k, v in flatten(run.derived).items()]
    table = pd.DataFrame(rows, columns=["section", "key", "value"]).set_index(["section", "key"])
    table["value"] = table["value"].map(lambda v: v if isinstance(v, str) else json.dumps(v))
    return table


def summary_table(runs: list[Run]) -> pd.DataFrame:
    """The summary.json of each run as one column, keys as rows; the status as `Run.status` has it (a run
    killed while running shows as `stale`)."""
    return pd.DataFrame({run.name: pd.Series(dict(run.summary, status=run.status), dtype=object) for run in runs})


def _last(frame: pd.DataFrame, column: str):
    values = frame[column].dropna()
    return values.iloc[-1] if len(values) else None


def _first(frame: pd.DataFrame, column: str):
    """The value on the first line, null or not: the step-0 eval is the "before" measurement."""
    if frame.empty or pd.isna(frame[column].iloc[0]):
        return None
    return frame[column].iloc[0]


def _summary_or(run: Run, key: str, fallback):
    """A summary value, or what the metrics so far say when the run has not written it (running, failed)."""
    value = run.summary.get(key)
    return fallback if value is None else value


def compare_runs(runs: list[Run]) -> pd.DataFrame:
    """One row per run: name, status, the settings that differ between the runs, and the outcome numbers."""
    flat = [flatten(run.config) for run in runs]
    keys = list(dict.fromkeys(key for settings in flat for key in settings))  # config order, not alphabetical

    def differs(key):
        return len({json.dumps(f.get(key), sort_keys=True, default=str) for f in flat}) > 1

    differing = [key for key in keys if differs(key)]
    rows = []
    for run, settings in zip(runs, flat):
        row = {"name": run.name, "status": run.status}
        trained = run.evals[run.evals["step"] > 0]  # "final" and "after" never fall back on the step-0 eval
        row.update({key: settings.get(key) for key in differing})
        row.update(
            train_loss_final=_last(run.train, "loss"),
            eval_loss_first=_summary_or(run, "eval_loss_first", _first(run.evals, "eval_loss")),
            eval_loss_final=_summary_or(run, "eval_loss_final", _last(trained, "eval_loss")),
            task_metric_name=_summary_or(run, "task_metric_name", _last(run.evals, "task_metric_name")),
            task_metric_before=_summary_or(run, "task_metric_before", _first(run.evals, "task_metric")),
            task_metric_after=_summary_or(run, "task_metric_after", _last(trained, "task_metric")),
            train_runtime=run.summary.get("train_runtime"),
            real_tokens_per_second=run.summary.get("real_tokens_per_second"),
        )
        rows.append(row)
    return pd.DataFrame(rows)


def samples_side_by_side(run: Run) -> pd.DataFrame:
    """One row per prompt index: the prompt, the reference, and the responses before and after training."""
    samples = run.samples
    if samples.empty:
        return pd.DataFrame(columns=SIDE_BY_SIDE_COLUMNS)
    # A resumed run may have written a stage twice; the last pass is the one that counts.
    samples = samples.drop_duplicates(["stage", "index"], keep="last")
    responses = samples.pivot(index="index", columns="stage", values="response")
    prompts = samples.drop_duplicates("index", keep="last").set_index("index")[["prompt", "reference"]]
    table = prompts.join(responses.reindex(columns=["before", "after"]))
    table = table.rename(columns={"before": "response_before", "after": "response_after"})
    return table.sort_index().reset_index()[SIDE_BY_SIDE_COLUMNS]


def runs_listing(runs: list[Run]) -> pd.DataFrame:
    """One row per run, for a look at a runs folder: its real status (`stale` for a run that says `running`
    while nobody holds its lock), the optimizer steps done of those planned, and the final numbers so far."""
    compared = compare_runs(runs)
    rows = []
    for run, numbers in zip(runs, compared.to_dict("records")):
        done = run.summary.get("global_step", _last(run.train, "step"))
        planned = run.derived.get("optimizer_steps")
        rows.append({"run": run.name, "status": run.status,
                     "steps": f"{0 if done is None else int(done)}/{planned if planned is not None else '?'}",
                     **{k: numbers[k] for k in ("train_loss_final", "eval_loss_first", "eval_loss_final",
                                                "task_metric_name", "task_metric_before", "task_metric_after")}})
    return pd.DataFrame(rows, columns=["run", "status", "steps", "train_loss_final", "eval_loss_first",
                                       "eval_loss_final", "task_metric_name", "task_metric_before",
                                       "task_metric_after"])


def main(argv: list[str] | None = None) -> int:
    """`python -m sft.analysis [runs/ | runs/<run> ...]`: lists runs with their status, steps and numbers."""
    import argparse
    import sys

    from .run_folder import partial_files_note

    parser = argparse.ArgumentParser(prog="python -m sft.analysis",
                                     description="List runs with their real status, steps and final numbers.")
    parser.add_argument("paths", nargs="*", default=[DEFAULT_RUNS_ROOT], metavar="PATH",
                        help="a runs folder (every run in it) or run folders (default: the repository's runs/)")
    args = parser.parse_args(argv)
    folders = [p for path in map(Path, args.paths)
               for p in ([path] if (path / "config.json").is_file() else find_runs(path))]
    if not folders:
        print(f"error: no run folders (folders with a config.json) in {', '.join(args.paths)}", file=sys.stderr)
        return 2
    runs, notes = [], []
    for folder in folders:
        try:
            runs.append(load_run(folder))
        except DataError as e:
            notes.append(f"skipped {folder}: {e}")
            continue
        notes += filter(None, [partial_files_note(folder)])
    with pd.option_context("display.max_colwidth", 60, "display.width", 250, "display.float_format", "{:.4f}".format):
        print(runs_listing(runs).to_string(index=False, na_rep="-"))
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
