"""Two processes under `accelerate launch` (gloo on the CPU) train like one process with the same
global batch: the same losses within float tolerance, one run folder written by rank 0 only, and
checkpoints that hold every rank's files."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sft.train import run

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, os, sys, time
import torch
import accelerate.checkpointing
torch.set_num_threads(1)
from sft import train
save = accelerate.checkpointing.torch.save
def late_save(obj, path, *args, **kwargs):  # rank 1 writes its random states after rank 0 has finished
    if os.environ["RANK"] == "1" and "random_states" in str(path):
        time.sleep(2)
    return save(obj, path, *args, **kwargs)
accelerate.checkpointing.torch.save = late_save
train.main({k.upper(): v for k, v in json.loads(sys.argv[1]).items()})
"""
# Gradients are all-reduced in a different summation order than one process adds them, so equality
# holds to float32 rounding, not bitwise: relative 1e-5 on losses after 3 steps.
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(folder: Path, kind: str, key: str) -> list[float]:
    lines = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    return [m[key] for m in lines if m["kind"] == kind]


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_config, tmp_path):
    one = run(tiny_config(micro_batch_size=2, grad_accum_steps=2, runs_root=str(tmp_path / "one")))
    settings = tiny_config(micro_batch_size=2, grad_accum_steps=1, runs_root=str(tmp_path / "two"),
                           checkpoint_every=2).to_dict()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "sft" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port",
                           str(free_port()), str(script), json.dumps(settings)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (two,) = list((tmp_path / "two").iterdir())  # rank 1 made no folder of its own
    assert json.loads((two / "config.json").read_text())["derived"]["world_size"] == 2
    assert metrics(two, "train", "loss") == pytest.approx(metrics(one.path, "train", "loss"), rel=TOLERANCE)
    assert metrics(two, "train", "tokens") == metrics(one.path, "train", "tokens")  # counted over both ranks
    assert metrics(two, "eval", "eval_loss") == pytest.approx(metrics(one.path, "eval", "eval_loss"), rel=TOLERANCE)
    assert json.loads((two / "summary.json").read_text())["status"] == "completed"
    # the checkpoint of step 2 was declared complete only after the slower rank had written its files
    saved = {p.name for p in (two / "checkpoints" / "step-000002").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= saved
    samples = [json.loads(l) for l in (two / "samples.jsonl").read_text().splitlines()]
    assert [(s["stage"], s["index"]) for s in samples] == [("before", 0), ("before", 1), ("after", 0), ("after", 1)]
