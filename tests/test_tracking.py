"""Trackers: TensorBoard event files (the default) hold exactly what metrics.jsonl holds, a resumed run
appends without repeating steps, W&B's offline run gets the same values, and a tracker that is not
installed stops the run before anything is loaded."""
from __future__ import annotations

from pathlib import Path

import pytest

from sft.analysis import read_metrics, read_samples
from sft.config import TrainConfig
from sft.errors import ConfigError
from sft.run import run


def metrics(folder: Path) -> list[dict]:
    return read_metrics(folder)


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    reader.Reload()
    return reader


def scalar_series(reader, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in reader.Scalars(tag)]


def expected(records: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in records if m["kind"] == kind and m.get(key) is not None]


def assert_same(reader, records: list[dict]) -> None:
    for tag, kind, key in [("train/loss", "train", "loss"), ("train/lr", "train", "lr"),
                           ("train/grad_norm", "train", "grad_norm"), ("train/tokens_per_s", "train", "tokens_per_s"),
                           ("eval/loss", "eval", "eval_loss"), ("eval/task_metric", "eval", "task_metric")]:
        got, want = scalar_series(reader, tag), expected(records, kind, key)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag  # stored as float32


def test_tensorboard_events_hold_what_metrics_jsonl_holds(tiny_config):
    folder = run(tiny_config(eval_every=2, max_steps=4))
    reader = events(folder.path)
    assert_same(reader, metrics(folder.path))
    texts = reader.Tags()["tensors"]  # text summaries are stored as tensors
    assert {"samples/before/text_summary", "samples/after/text_summary", "config/text_summary"} <= set(texts)
    after = reader.Tensors("samples/after/text_summary")[0]
    samples = read_samples(folder.path)
    text = after.tensor_proto.string_val[0].decode()
    assert after.step == 4 and all(s["response"].replace("|", "\\|") in text for s in samples if s["stage"] == "after")


def test_a_resumed_run_appends_without_repeating_steps(tiny_config, monkeypatch):
    from sft.loop import train_step

    cfg = tiny_config(max_steps=6, checkpoint_every=2, eval_every=3)
    real_step, calls = train_step, [0]

    def failing_step(setup, batches):
        calls[0] += 1
        if calls[0] == 4:  # after step 3 was logged, past the step-2 checkpoint
            raise RuntimeError("the machine went away")
        return real_step(setup, batches)

    with pytest.raises(RuntimeError):
        run(cfg, step=failing_step)
    folder = next(Path(cfg.runs_root).iterdir())
    assert 3 in [s for s, _ in scalar_series(events(folder), "train/loss")]  # logged before the failure
    run(tiny_config(resume=str(folder)))
    reader = events(folder)
    steps = [s for s, _ in scalar_series(reader, "train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4  # step 3 once: the one logged after the resume
    assert_same(reader, metrics(folder))


def test_wandb_offline_run_gets_the_same_values(tiny_config, monkeypatch):
    """A real W&B run in offline mode (nothing leaves the machine): every metrics record is logged at its
    step with the values metrics.jsonl holds, and the samples become W&B tables."""
    wandb = pytest.importorskip("wandb")
    from sft.tracking import scalars

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_log = wandb.Run.log

    def spy(self, data, step=None, **kwargs):
        logged.append((step, {k: v for k, v in data.items() if isinstance(v, float)}))
        return real_log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", spy)
    folder = run(tiny_config(report_to=("tensorboard", "wandb"), max_steps=2))
    runs = list((folder.path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert [(step, values) for step, values in logged if values] == [
        (m["step"], scalars(m)) for m in metrics(folder.path)]
    tables = {p.name.split("_")[0] for p in runs[0].rglob("*.table.json")}
    assert tables == {"before", "after"}


def test_a_tracker_that_is_not_installed_stops_the_run_before_anything_loads(tiny_config, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = tiny_config(report_to=("tensorboard", "mlflow"))
    with pytest.raises(ConfigError, match=r"report_to: mlflow is not installed; pip install mlflow"):
        run(cfg)
    assert not Path(cfg.runs_root).exists() or not any(Path(cfg.runs_root).iterdir())


@pytest.mark.parametrize("settings, message", [
    (dict(report_to=("tensorbaord",)), "report_to: 'tensorbaord' is not one of"),
    (dict(report_to="wandb"), "report_to: expected tuple"),
    (dict(report_to=("wandb", "wandb")), "names a tracker twice"),
    (dict(push_to_hub="just-a-name"), "push_to_hub: a hub repository id of the form owner/name"),
    (dict(push_to_hub="me/model", save_model=False), "push_to_hub: uploads the saved model"),
])
def test_tracking_and_upload_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrainConfig(experiment="x", **settings)
