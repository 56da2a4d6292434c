"""Checkpoints inside the run folder: `checkpoints/step-<N>/`, complete or absent.

A checkpoint is accelerate's `save_state` (model, optimizer, RNG states of Python, NumPy, torch and
CUDA for every process; sharded under FSDP) plus the scheduler and `trainer_state.json` (the step
reached, token counters, timers, the losses so far). It is written under a temporary name and renamed
when complete, so resume never picks up a half-written one; only the newest `keep` are kept. The
position in the data is the step index: the step plan is a pure function of the data and the seed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import SFTError
from .run_folder import require_room

PREFIX = "step-"


class CheckpointError(SFTError):
    """A checkpoint cannot be written or read; `path` is the checkpoint's folder."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


def checkpoints(run_path: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_path) / "checkpoints"
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                   and (p / "trainer_state.json").exists()), key=lambda p: int(p.name[len(PREFIX):]))


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The bytes of a checkpoint: the trainable weights (all of them in full finetuning; an adapter run's
    checkpoints hold no frozen weight, see sft.lora) and the optimizer's states."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor))
    return params + states


def check_disk(path: Path, need: int) -> None:
    require_room(path, need, lambda free: CheckpointError(
        f"not enough free disk space for a checkpoint at {path}: it needs about {need / 2**30:.2f} GiB and "
        f"{free / 2**30:.2f} GiB are free; free space or set checkpoint_every=None", path))


def save(accelerator, run_path: Path, step: int, trainer_state: dict, scheduler, keep: int, need_bytes: int) -> Path:
    """Saves a complete checkpoint of `step` (accelerate's state, the scheduler, the loop's state), renamed
    into place when whole, after checking for `need_bytes` of room; keeps the newest `keep`."""
    root = Path(run_path) / "checkpoints"
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    problem = None
    if accelerator.is_main_process:
        root.mkdir(exist_ok=True)
        try:
            check_disk(root, int(need_bytes * 1.05))
        except CheckpointError as e:
            problem = str(e)
        shutil.rmtree(tmp, ignore_errors=True)
    if accelerator.num_processes > 1:  # every process must stop, or the others wait in the save forever
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem:
        raise CheckpointError(problem, final)
    try:
        accelerator.save_state(str(tmp), safe_serialization=False)
        # save_state ends without a barrier: every process's files (its random states, FSDP's shards) must be
        # written before the main process renames the folder and so declares the checkpoint complete.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), tmp / "scheduler_state.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            prune(run_path, keep)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its stream
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written checkpoint stays behind; the older ones do
        detail = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
        free = require_room(root, 0)
        if free < 2**20 and "No space left on device" not in detail:
            detail = f"No space left on device: {detail}"
        raise CheckpointError(f"writing the checkpoint of step {step} into {final} failed ({detail}; "
                              f"{free / 2**30:.2f} GiB free there)", final) from e
    accelerator.wait_for_everyone()
    return final


def prune(run_path: Path, keep: int) -> None:
    """Deletes all but the newest `keep` checkpoints (all of them with keep=0, and the folder with them)."""
    found = checkpoints(run_path)
    for old in found[:len(found) - keep]:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(run_path) / "checkpoints"
    if keep == 0 and root.exists() and not any(root.iterdir()):
        root.rmdir()


def load_latest(accelerator, run_path: Path, scheduler) -> dict | None:
    """Restores the newest complete checkpoint into the prepared objects; returns its trainer state."""
    found = checkpoints(run_path)
    if not found:
        return None
    latest = found[-1]
    accelerator.load_state(str(latest))
    scheduler.load_state_dict(torch.load(latest / "scheduler_state.pt", weights_only=False))
    return json.loads((latest / "trainer_state.json").read_text())
