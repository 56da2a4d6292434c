"""A run killed mid-training and resumed reproduces the uninterrupted run step by step, bitwise on CPU."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sft.analysis import read_metrics
from sft.checkpoint import checkpoints
from sft.config import TrainConfig
from sft.errors import ConfigError
from sft.run import run

ROOT = Path(__file__).resolve().parents[1]

# Runs the settings given as JSON, and at the start of step KILL_AT sends itself the signal SIGNAL.
CHILD = """
import json, os, signal, sys
import torch
torch.set_num_threads(2)
from sft.loop import train_step
from sft.run import main
settings, kill_at, sig = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
calls = [0]
def step(setup, batches):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), getattr(signal, sig))
    return train_step(setup, batches)
main({k.upper(): v for k, v in settings.items()}, step=step)
"""


def losses(folder: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(folder, "train")]


def final_eval_loss(folder: Path) -> float:
    return read_metrics(folder, "eval")[-1]["eval_loss"]


def run_child(settings: dict, kill_at: int, sig: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings), str(kill_at), sig], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with attention dropout: its losses depend on the random stream and on training mode
    (from_pretrained returns a model in eval mode, where dropout is off), so a resume must restore both."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("dropout-llama")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.attention_dropout = 0.3
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((tiny_model_dir / name).read_bytes())
    return path


@pytest.fixture
def settings(tiny_config, dropout_model_dir):
    return tiny_config(model=str(dropout_model_dir), max_steps=6, max_rows=160, checkpoint_every=2,
                       keep_checkpoints=2, lr_schedule="cosine", warmup_ratio=0.2, task_metric_rows=2,
                       num_samples=1).to_dict()


@pytest.fixture
def reference(settings, tmp_path):
    ref = run(TrainConfig(**dict(settings, runs_root=str(tmp_path / "reference"))))
    return ref.path


@pytest.mark.parametrize("sig, kill_at, resumes_from, code", [
    ("SIGKILL", 5, 4, -signal.SIGKILL),  # hard crash during step 5: back to the checkpoint of step 4
    ("SIGTERM", 3, 3, 143),              # preemption during step 3: checkpoint at the end of step 3
])
def test_killed_run_resumes_to_the_same_losses_bitwise(settings, reference, tmp_path, sig, kill_at,
                                                       resumes_from, code):
    settings = dict(settings, runs_root=str(tmp_path / "killed"))
    proc = run_child(settings, kill_at, sig)
    assert proc.returncode == code, proc.stderr[-2000:]
    (folder,) = list((tmp_path / "killed").iterdir())
    saved = checkpoints(folder)
    assert int(saved[-1].name.split("-")[1]) == resumes_from and len(saved) <= 2
    assert not [p for p in (folder / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    status = json.loads((folder / "summary.json").read_text())["status"]
    assert status == ("interrupted" if sig == "SIGTERM" else "running")

    run(TrainConfig(**dict(settings, resume=str(folder))))
    assert losses(folder) == losses(reference)  # every step exactly once, bitwise equal floats
    assert final_eval_loss(folder) == final_eval_loss(reference)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 6
    env = json.loads((folder / "env.json").read_text())
    assert len(env["resumes"]) == 1


def test_resume_refuses_a_completed_run_and_a_folder_without_checkpoints(settings, reference, tmp_path):
    with pytest.raises(ConfigError, match="already completed"):
        run(TrainConfig(**dict(settings, resume=str(reference))))
    with pytest.raises(ConfigError, match="not a run folder"):
        run(TrainConfig(**dict(settings, resume=str(tmp_path))))


def test_checkpoint_refuses_to_start_without_disk_space(tiny_config, monkeypatch):
    import shutil
    from collections import namedtuple

    from sft.run import RunWriteError

    usage = namedtuple("usage", "total used free")
    def filled_after_the_start(path):  # room at the checks before loading, none by the first checkpoint
        return usage(10, 10, 0) if Path(path).name == "checkpoints" else usage(10, 0, 10 * 2**30)

    monkeypatch.setattr(shutil, "disk_usage", filled_after_the_start)
    with pytest.raises(RunWriteError, match="not enough free disk space .*; the run is marked failed"):
        run(tiny_config(max_steps=3, checkpoint_every=1))


def test_a_run_with_8bit_optimizer_states_resumes_bitwise(tiny_config, tmp_path):
    """Pure bf16 weights with stochastic rounding and block-wise 8-bit moments (the tied embedding is
    large enough to be quantized; the small layers keep fp32 moments): preempted at step 3 and resumed,
    the run repeats the uninterrupted one's losses exactly."""
    settings = tiny_config(max_steps=4, max_rows=96, checkpoint_every=2, precision="bf16_pure",
                           optimizer_state_dtype="int8", task_metric=None, num_samples=0).to_dict()
    reference = run(TrainConfig(**dict(settings, runs_root=str(tmp_path / "reference")))).path
    derived = json.loads((reference / "config.json").read_text())["derived"]
    assert derived["optimizer"] == "BF16AdamW (stochastic_rounding, 8-bit block-wise states, eager step)"
    assert derived["bf16_update"] == "stochastic_rounding"

    settings = dict(settings, runs_root=str(tmp_path / "killed"))
    proc = run_child(settings, 3, "SIGTERM")
    assert proc.returncode == 143, proc.stderr[-2000:]
    (folder,) = list((tmp_path / "killed").iterdir())
    run(TrainConfig(**dict(settings, resume=str(folder))))
    assert losses(folder) == losses(reference)
    assert final_eval_loss(folder) == final_eval_loss(reference)
