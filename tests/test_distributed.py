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

from sft.analysis import read_metrics, read_samples
from sft.run import run

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, os, sys, time
import torch
import accelerate.checkpointing
torch.set_num_threads(1)
from sft.run import main
save = accelerate.checkpointing.torch.save
def late_save(obj, path, *args, **kwargs):  # rank 1 writes its random states after rank 0 has finished
    if os.environ["RANK"] == "1" and "random_states" in str(path):
        time.sleep(2)
    return save(obj, path, *args, **kwargs)
accelerate.checkpointing.torch.save = late_save
main({k.upper(): v for k, v in json.loads(sys.argv.pop(1)).items()})  # a script takes no arguments
"""
# Gradients are all-reduced in a different summation order than one process adds them, so equality
# holds to float32 rounding, not bitwise: relative 1e-5 on losses after 3 steps.
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(folder: Path, kind: str, key: str) -> list[float]:
    return [m[key] for m in read_metrics(folder, kind)]


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_config, tmp_path):
    one = run(tiny_config(micro_batch_size=2, grad_accum_steps=2, runs_root=str(tmp_path / "one")))
    settings = tiny_config(micro_batch_size=2, grad_accum_steps=1, runs_root=str(tmp_path / "two"),
                           checkpoint_every=2, keep_checkpoints_after_completion=2).to_dict()
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
    samples = read_samples(two)
    assert [(s["stage"], s["index"]) for s in samples] == [("before", 0), ("before", 1), ("after", 0), ("after", 1)]


FSDP_CHILD = """
import json, sys, tempfile
from pathlib import Path
import torch
from bench.synthetic import model_folder, synthetic_examples
from sft.config import TrainConfig
from sft.data import PreparedData
from sft.loop import train_step
from sft.setup import build
work = Path(tempfile.mkdtemp())
extra = json.loads(sys.argv[2])  # settings of the case: adapters or none
examples = synthetic_examples(8 * 4 * 256, 1000, seed=0, max_length=256)
cfg = TrainConfig(experiment="fsdp_check", model=f"random-init:{model_folder('tiny', work / 'model')}",
                  template="plain", max_length=256, micro_batch_size=2, grad_accum_steps=2, max_steps=4,
                  precision="bf16_autocast", lr=1e-3, lr_schedule="constant", warmup_ratio=0.0, seed=0,
                  task_metric=None, num_samples=0, save_model=False, runs_root=str(work / "runs"), **extra)
setup = build(cfg, PreparedData(train=[e.to_example() for e in examples], eval=[], eval_conversations=[], stats={}))
losses = [train_step(setup, batches).loss for batches in setup.batches()]
if setup.accelerator.is_main_process:
    Path(sys.argv[1]).write_text(json.dumps({"losses": losses, "type": setup.accelerator.distributed_type.name}))
"""


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="FSDP2 on one GPU needs a CUDA device")
@pytest.mark.parametrize("extra", [{}, {"finetune": "lora", "lora_r": 8}], ids=["full", "lora"])
def test_fsdp2_config_on_one_gpu_trains_like_the_plain_run(tmp_path, extra):
    """The shipped FSDP2 config (sharding, its own activation checkpointing, bf16 mixed precision) in one
    process on a GPU: the same losses as the run without FSDP, to bf16 rounding; with adapters too (the
    frozen base and the trainable adapters in the same sharded layers)."""
    script = tmp_path / "child.py"
    script.write_text(FSDP_CHILD)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    plain = subprocess.run([sys.executable, str(script), str(tmp_path / "plain.json"), json.dumps(extra)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    fsdp = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "sft" / "accelerate" / "fsdp2.yaml"), "--num_processes", "1",
                           "--main_process_port", str(free_port()), str(script), str(tmp_path / "fsdp.json"),
                           json.dumps(extra)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    plain, fsdp = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("plain", "fsdp"))
    assert (plain["type"], fsdp["type"]) == ("NO", "FSDP")
    print("losses without FSDP", plain["losses"], "with FSDP2", fsdp["losses"])
    assert len(fsdp["losses"]) == 4 and fsdp["losses"] == pytest.approx(plain["losses"], rel=2e-2)
