"""Experiment trackers: the run's metrics and samples, mirrored to TensorBoard (the default), Weights &
Biases, Trackio or MLflow as they are written.

The run folder's files stay the record; a tracker is a view for watching a run live and comparing runs in
the tracker's own interface. `RunFolder.append_metrics` writes a record to metrics.jsonl and hands the same
record to every tracker, so a tracker shows exactly what metrics.jsonl holds:

- train records: `train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_s`, `train/tokens`;
- eval records: `eval/loss`, `eval/task_metric` (when computed), `eval/loss/<dataset>` (a mixture);
- samples: each generation pass's prompts and responses as text (`samples/<stage>`).

All of them are logged against the optimizer step. A resumed run drops what was logged after its checkpoint
(TensorBoard purges those steps, as metrics.jsonl is cut back), so no step appears twice.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError

def check_available(report_to) -> None:
    """Every tracker asked for is installed (each is the package of its name): checked when a run starts,
    before any data or model is loaded."""
    missing = [name for name in report_to if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
                          f"pip install {' '.join(missing)}, or leave {'it' if len(missing) == 1 else 'them'} out "
                          f"of report_to")


def scalars(record: dict) -> dict[str, float]:
    """The tracker view of a metrics.jsonl record: name -> value, without the values that are not numbers.

    >>> scalars({"kind": "eval", "step": 4, "eval_loss": 1.5, "task_metric": None, "eval_loss_by_source": {"a": 1.2}})
    {'eval/loss': 1.5, 'eval/loss/a': 1.2}
    """
    kind = record["kind"]
    if kind == "train":
        names = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                 "tokens_per_s": "train/tokens_per_s", "tokens": "train/tokens"}
    else:
        names = {"eval_loss": "eval/loss", "task_metric": "eval/task_metric"}
    out = {tag: float(record[key]) for key, tag in names.items() if isinstance(record.get(key), (int, float))}
    for source, loss in (record.get("eval_loss_by_source") or {}).items():
        if isinstance(loss, (int, float)):
            out[f"eval/loss/{_tag(source)}"] = float(loss)
    return out


def _tag(name: str) -> str:
    """A dataset's name as a tag part: its file or repository name, without characters trackers refuse."""
    return re.sub(r"[^\w.\-]", "_", Path(name).name or name)


def samples_markdown(rows: list[dict]) -> str:
    """A generation pass's samples as a markdown table (TensorBoard renders text summaries as markdown)."""
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| # | prompt | response | reference |", "|---|---|---|---|"]
    lines += [f"| {r['index']} | {cell(r['messages'][-1]['content'])} | {cell(r['response'])} | "
              f"{cell(r.get('reference', ''))} |" for r in rows]
    return "\n".join(lines)


class Trackers:
    """The trackers of one run (main process only). `resume_step`: the checkpoint's step when resuming, so
    that what was logged after it is dropped."""

    def __init__(self, report_to, folder: Path, name: str, config: dict, resume_step: int | None = None):
        check_available(report_to)
        self.backends = [_OPEN[backend](Path(folder), name, config, resume_step) for backend in report_to]

    def log(self, record: dict) -> None:
        values = scalars(record)
        for backend in self.backends:
            backend.log(values, record["step"])

    def samples(self, stage: str, step: int, rows: list[dict]) -> None:
        if rows:
            for backend in self.backends:
                backend.text(f"samples/{stage}", samples_markdown(rows), rows, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


class _TensorBoard:
    """Event files in <run>/tensorboard, flushed at every record so a running `tensorboard --logdir runs`
    shows the run live."""

    def __init__(self, folder: Path, name: str, config: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what a crashed run logged from this step on
        self.writer = SummaryWriter(str(folder / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("config", "```\n" + "\n".join(f"{k}: {v}" for k, v in config.items()) + "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def text(self, tag: str, markdown: str, rows: list[dict], step: int) -> None:
        self.writer.add_text(tag, markdown, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A W&B run named after the run folder, in <run>/wandb (WANDB_MODE=offline runs without a network;
    `wandb sync` uploads later). A resumed run continues the same W&B run."""

    def __init__(self, folder: Path, name: str, config: dict, resume_step: int | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=config.get("experiment"), name=name, id=_run_id(name), dir=str(folder),
                              config=config, resume="allow")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def text(self, tag: str, markdown: str, rows: list[dict], step: int) -> None:
        table = self.wandb.Table(columns=["index", "prompt", "response", "reference"],
                                 data=[[r["index"], r["messages"][-1]["content"], r["response"], r.get("reference")]
                                       for r in rows])
        self.run.log({tag: table}, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """A Trackio run (local-first: its own database, viewed with `trackio show`)."""

    def __init__(self, folder: Path, name: str, config: dict, resume_step: int | None):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=config.get("experiment"), name=name, config=config, resume="allow")

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def text(self, tag: str, markdown: str, rows: list[dict], step: int) -> None:
        self.trackio.log({tag: markdown}, step=step)

    def close(self) -> None:
        self.trackio.finish()


class _MLflow:
    """An MLflow run named after the run folder; without MLFLOW_TRACKING_URI, stored in <run>/mlruns."""

    def __init__(self, folder: Path, name: str, config: dict, resume_step: int | None):
        import os

        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
        mlflow.set_experiment(config.get("experiment") or "sft")
        found = mlflow.search_runs(filter_string=f"tags.mlflow.runName = '{name}'", output_format="list")
        self.run = mlflow.start_run(run_id=found[0].info.run_id if found else None,
                                    run_name=None if found else name)
        if not found:
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def text(self, tag: str, markdown: str, rows: list[dict], step: int) -> None:
        self.mlflow.log_text(markdown, f"{tag}_step{step}.md")

    def close(self) -> None:
        self.mlflow.end_run()


def _run_id(name: str) -> str:
    """A tracker run id from the run folder's name (stable across resumes; letters, digits, - and _ only)."""
    return re.sub(r"[^\w\-]", "-", name)[:64]


_OPEN: dict[str, Any] = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio, "mlflow": _MLflow}
