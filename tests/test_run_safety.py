"""Run folders that never lie: one live process per folder (a lock), checks before anything is loaded, a full
disk at every stage of writing, checkpoints after completion and extending a completed run, and what the
console says on Ctrl-C."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sft.run
from sft import checkpoint
from sft.analysis import load_run, read_metrics, summary_table
from sft.errors import ConfigError
from sft.run_folder import LOCK, RunLockError, lock_is_held
from sft.loop import Interrupted, StopRequest, train_step
from sft.run import run

ROOT = Path(__file__).resolve().parents[1]
HOLD_LOCK = ("import sys, time; from sft.run_folder import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
             "print('held', flush=True); time.sleep(600)")


@contextlib.contextmanager
def holding_lock(folder: Path):
    """Another process that holds the run folder's lock, as a training process would."""
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert child.stdout.readline().strip() == "held"
        yield child
    finally:
        child.kill()
        child.wait()


@contextlib.contextmanager
def filesystem(path: Path, size: str, read_only: bool = False):
    """A small file system of its own (tmpfs) at `path`: a full disk or a read-only folder that is real, not
    simulated. Needs the right to mount (root, as CI runs)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path, leave: int = 0) -> None:
    """Takes all the free space of `path`'s file system but `leave` bytes."""
    with open(path / "filler", "wb") as f:
        try:
            while True:
                free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
                if free <= leave:
                    break
                f.write(b"\0" * min(free - leave, 1 << 20))
                f.flush()
        except OSError:
            pass


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders a write could leave behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.startswith(".") or p.name.endswith(".tmp") or p.name == LOCK)


# ------------------------------------------------------------------------------------------------ the lock


def test_a_second_process_cannot_resume_into_a_live_run_and_spends_no_compute(tiny_config, tmp_path, monkeypatch):
    first = run(tiny_config(checkpoint_every=1, max_steps=2, keep_checkpoints_after_completion=1))
    summary = json.loads((first.path / "summary.json").read_text())
    json.dump(dict(summary, status="interrupted"), open(first.path / "summary.json", "w"))  # as if stopped
    built = []
    with holding_lock(first.path):
        assert lock_is_held(first.path)
        with pytest.raises(RunLockError, match="is in use: another process is training in it .*\"pid\""):
            run(tiny_config(resume=str(first.path)), build=lambda *a, **k: built.append(1))
    assert not built


def test_a_run_whose_process_was_killed_is_stale_and_can_be_resumed(tiny_config, tmp_path):
    folder = run(tiny_config(checkpoint_every=1, max_steps=2, keep_checkpoints_after_completion=1)).path
    (folder / "summary.json").write_text(json.dumps({"status": "running"}))  # what a SIGKILL leaves
    with holding_lock(folder) as child:
        assert load_run(folder).status == "running"
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (folder / LOCK).exists() and not lock_is_held(folder)
    assert load_run(folder).status == "stale"
    assert summary_table([load_run(folder)]).loc["status"].item() == "stale"  # as the notebook shows it
    resumed = run(tiny_config(resume=str(folder)))  # the dead owner's lock is taken over
    assert load_run(resumed.path).status == "completed" and not (folder / LOCK).exists()


def test_the_lock_is_held_while_training_and_released_at_the_end(tiny_config, monkeypatch):
    seen = []

    def watching(setup, batches):
        seen.append(lock_is_held(Path(setup.accelerator.project_dir or ".")) or any(
            lock_is_held(p) for p in Path(tiny_config().runs_root).iterdir()))
        return train_step(setup, batches)

    folder = run(tiny_config(max_steps=2), step=watching).path
    assert seen == [True, True]
    assert not (folder / LOCK).exists()


# --------------------------------------------------------------------------------------- checks up front


def test_a_read_only_runs_folder_stops_before_anything_is_loaded(tiny_config, tmp_path, monkeypatch):
    loaded = []
    with filesystem(tmp_path / "ro", "1m", read_only=True) as ro:
        with pytest.raises(ConfigError, match=r"^runs_root: .*/ro/runs cannot be written"):
            run(tiny_config(runs_root=str(ro / "runs")), build=lambda *a, **k: loaded.append(1))
    assert not loaded


def test_a_runs_folder_without_room_for_the_model_and_a_checkpoint_stops_first(tiny_config, tmp_path, monkeypatch):
    loaded = []
    with filesystem(tmp_path / "small", "1m") as small:
        with pytest.raises(ConfigError, match=r"runs_root: .* GiB free, and the final model and one checkpoint need "
                                              r"about 0\.0\d GiB"):
            run(tiny_config(runs_root=str(small), save_model=True, checkpoint_every=1),
                build=lambda *a, **k: loaded.append(1))
    assert not loaded


def test_the_estimate_counts_weights_in_their_dtype_and_the_optimizer_states():
    from sft.config import TrainConfig

    fp32 = TrainConfig(experiment="x", precision="bf16_autocast")
    assert sft.run.output_bytes(fp32, 1000) == (4000, 12000)  # fp32 weights + two fp32 moments
    int8 = TrainConfig(experiment="x", precision="bf16_pure", optimizer_state_dtype="int8")
    assert sft.run.output_bytes(int8, 1000) == (2000, 4000)


# ---------------------------------------------------------------------------------------------- full disk

STAGES = {
    # stage: (object, attribute) whose call fills the disk first
    "checkpoint": ("accelerate.Accelerator", "save_state"),
    "model": ("transformers.PreTrainedModel", "save_pretrained"),
    "figures": ("sft.plotting", "write_figures"),
    "summary": ("sft.run_folder.RunFolder", "update_summary"),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_disk_that_fills_at_each_stage_leaves_a_failed_run_and_no_temporary_files(stage, tiny_config, tmp_path,
                                                                                    monkeypatch):
    import importlib

    owner_name, attr = STAGES[stage]
    module_name, _, class_name = owner_name.rpartition(".") if stage != "figures" else (owner_name, "", "")
    owner = importlib.import_module(module_name)
    owner = getattr(owner, class_name) if class_name else owner
    original = getattr(owner, attr)
    with filesystem(tmp_path / "disk", "64m") as disk:
        def filled_first(*args, **kwargs):
            if stage != "summary" or kwargs.get("status") == "completed":  # the summary's final write
                fill(disk)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attr, filled_first)
        if stage == "figures":
            monkeypatch.setattr("sft.plotting.write_figures", filled_first)
        with pytest.raises(sft.run.RunWriteError) as failed:
            run(tiny_config(runs_root=str(disk / "runs"), save_model=True, checkpoint_every=2,
                            keep_checkpoints_after_completion=1))
        assert " GiB free there); the run is marked failed; " in str(failed.value)
        (folder,) = list((disk / "runs").iterdir())
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["status"] == "failed" and "No space left on device" in summary["reason"], summary
        assert leftovers(folder) == []
        if stage in ("model", "figures", "summary"):
            assert summary.get("eval_loss_final") is not None  # the numbers were written before the model
        if stage == "model":
            assert not (folder / "model").exists()  # never a folder with a few files of a model
        if stage in ("figures", "summary"):
            assert (folder / "model" / "config.json").exists() and any((folder / "model").glob("*.safetensors"))
        metrics = read_metrics(folder)
        assert metrics and metrics[0]["kind"] == "eval"


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_metrics_at_step_3(monkeypatch):
    """The train line of step 3 finds the disk full (metrics.jsonl holds the step-0 eval and steps 1 and 2)."""
    import sft.run_folder

    def appending(path, record):
        metrics = Path(path).name == "metrics.jsonl" and Path(path).is_file()
        if metrics and len(Path(path).read_bytes().splitlines()) == 3:
            raise no_space()

    monkeypatch.setattr(sft.run_folder, "WRITE_HOOK", appending)


def fail_the_second_checkpoint(monkeypatch):
    import accelerate

    save_state, calls = accelerate.Accelerator.save_state, []

    def saving(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise no_space()
        return save_state(self, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", saving)


def fail_the_model_halfway(monkeypatch):
    import transformers

    def saving(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 1000)  # a part of the weights, then a full disk
        raise no_space()

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", saving)


def fail_the_completed_summary(monkeypatch):
    import sft.run_folder

    def writing(path, obj):
        if Path(path).name == "summary.json" and obj.get("status") == "completed":
            raise no_space()

    monkeypatch.setattr(sft.run_folder, "WRITE_HOOK", writing)


@pytest.mark.parametrize("stage, checkpoint_every, failed_path, kept", [
    ("metrics", 2, "metrics.jsonl", "the newest checkpoint, of step 2, is kept: to continue from it once there is "
                                    'room, set RESUME = "{run}" in the script'),
    ("metrics", None, "metrics.jsonl", "no checkpoint was kept to resume from (CHECKPOINT_EVERY = N keeps one every "
                                       "N steps)"),
    ("checkpoint", 2, "checkpoints/step-000004", "the newest checkpoint, of step 2, is kept: to continue from it "
                                                 'once there is room, set RESUME = "{run}" in the script'),
    ("model", 2, "model", 'the newest checkpoint, of step 4, is kept: to continue from it once there is room, set '
                          'RESUME = "{run}" in the script'),
    ("summary", 2, "summary.json", "the model is saved in {run}/model; no checkpoint is left to resume from"),
])
def test_a_write_that_fails_after_the_start_is_one_error_line_naming_the_path_the_room_and_what_is_kept(
        stage, checkpoint_every, failed_path, kept, tiny_config, monkeypatch, capsys):
    {"metrics": fail_metrics_at_step_3, "checkpoint": fail_the_second_checkpoint, "model": fail_the_model_halfway,
     "summary": fail_the_completed_summary}[stage](monkeypatch)
    settings = {k.upper(): v for k, v in tiny_config(max_steps=5, log_every=1, checkpoint_every=checkpoint_every,
                                                     save_model=True).to_dict().items()}
    with pytest.raises(SystemExit) as exit_code:
        sft.run.main(settings)
    assert exit_code.value.code == 2
    (folder,) = list(Path(settings["RUNS_ROOT"]).iterdir())
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: writing {folder / failed_path}") or \
        errors[0].startswith(f"error: writing the checkpoint of step 4 into {folder / failed_path} failed")
    assert re.search(r"\(No space left on device: .*; \d+\.\d\d GiB free there\)|\(No space left on device; "
                     r"\d+\.\d\d GiB free there\)", errors[0]), errors[0]
    assert errors[0].endswith(kept.format(run=folder)), errors[0]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] == errors[0].removeprefix("error: ")
    assert leftovers(folder) == []  # no .model.tmp, no partial checkpoint, no lock
    assert (folder / "model").exists() == (stage == "summary")


# ------------------------------------------------------------------------------ checkpoints after the end


def test_checkpoints_are_deleted_at_completion_by_default(tiny_config):
    folder = run(tiny_config(checkpoint_every=1, max_steps=3)).path
    assert checkpoint.checkpoints(folder) == [] and not (folder / "checkpoints").exists()


def test_a_completed_run_that_kept_its_checkpoint_trains_further_with_more_steps(tiny_config, capsys):
    folder = run(tiny_config(checkpoint_every=10, max_steps=2, keep_checkpoints_after_completion=1)).path
    assert [p.name for p in checkpoint.checkpoints(folder)] == ["step-000002"]  # the final step's
    with pytest.raises(ConfigError, match="has already completed; to train it further, raise EPOCHS or MAX_STEPS"):
        run(tiny_config(resume=str(folder), max_steps=2, keep_checkpoints_after_completion=1))
    run(tiny_config(resume=str(folder), max_steps=4, keep_checkpoints_after_completion=1))
    assert "extending the completed run: max_steps 2 -> 4" in capsys.readouterr().err
    result = load_run(folder)
    assert result.status == "completed" and result.summary["global_step"] == 4
    assert list(result.train["step"]) == [1, 2, 3, 4]
    assert json.loads((folder / "config.json").read_text())["config"]["max_steps"] == 4


def test_a_completed_run_without_checkpoints_cannot_be_extended(tiny_config):
    folder = run(tiny_config(max_steps=2)).path
    with pytest.raises(ConfigError, match="kept no checkpoint to train further from"):
        run(tiny_config(resume=str(folder), max_steps=4))


# ------------------------------------------------------------------------------------------- the console


def test_the_first_ctrl_c_is_acknowledged_at_once(capsys):
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
    assert stop.signal == "SIGINT"
    assert "SIGINT received: finishing the current step, then saving a checkpoint; press Ctrl-C again" in \
        capsys.readouterr().err


def test_a_second_ctrl_c_names_the_newest_checkpoint_and_how_to_resume(tiny_config, monkeypatch, capsys):
    calls = []

    def second_ctrl_c_in_step_3(setup, batches):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return train_step(setup, batches)

    settings = {k.upper(): v for k, v in tiny_config(checkpoint_every=2, max_steps=4).to_dict().items()}
    with pytest.raises(SystemExit) as exit_code:
        sft.run.main(settings, step=second_ctrl_c_in_step_3)
    assert exit_code.value.code == 130
    (folder,) = list(Path(settings["RUNS_ROOT"]).iterdir())
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert "stopped at once by a second signal; newest checkpoint: step 2" in summary["reason"]
    err = capsys.readouterr().err
    assert f'RESUME = "{folder}"' in err or f'RESUME = "{os.path.relpath(folder)}"' in err


def test_interrupted_carries_its_signal_and_checkpoint(tmp_path):
    e = Interrupted("SIGTERM", tmp_path, tmp_path / "checkpoints" / "step-000007", "stopped after step 7")
    assert (e.signal, e.checkpoint_step, e.run_path) == ("SIGTERM", 7, tmp_path)
    assert str(e).startswith("SIGTERM: stopped after step 7; newest checkpoint: step 7")


# -------------------------------------------------------------------------------------- model paths


def test_a_relative_model_path_that_does_not_exist_is_named_as_a_path(tmp_path, monkeypatch):
    from sft.modeling import resolve_model_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ConfigError, match=r"model: 'models/mine' does not exist: .*/models has no folder 'mine'"):
        resolve_model_source("models/mine", None)
    with pytest.raises(ConfigError, match=r"'owner/name' is not a folder here \(relative paths are taken from "
                                          r".*\), so it is read as a hub id, and a hub model needs a pinned revision"):
        resolve_model_source("owner/name", None)


def test_a_model_folder_without_tokenizer_files_names_them(tiny_model_dir, tmp_path):
    from sft.modeling import load_tokenizer

    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights_only / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(ConfigError) as info:
        load_tokenizer(str(weights_only))
    message = str(info.value)
    assert "has no tokenizer files: it lacks tokenizer.json" in message and "vocab.json with merges.txt" in message
    assert "\n" not in message and not message.rstrip().endswith(":")


def test_the_room_check_names_what_is_missing_in_a_sentence(tiny_config, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 0))

    def loaded(*args, **kwargs):
        pytest.fail("loaded")

    with pytest.raises(ConfigError, match=r"0\.00 GiB free, and the final model needs about"):
        run(tiny_config(save_model=True), build=loaded)
    with pytest.raises(ConfigError, match=r"and the final model and one checkpoint need about"):
        run(tiny_config(save_model=True, checkpoint_every=1), build=loaded)


# ------------------------------------------------------------------------------------------ partial files


def leave_partial_files(folder: Path) -> None:
    """What a final save and a checkpoint killed halfway, and a JSON write cut short, leave behind."""
    (folder / ".model.tmp").mkdir()
    (folder / ".model.tmp" / "model.safetensors").write_bytes(b"\0" * 3_000_000)
    (folder / "checkpoints" / ".tmp-step-000003").mkdir(parents=True)
    (folder / "checkpoints" / ".tmp-step-000003" / "optimizer.bin").write_bytes(b"\0" * 1000)
    (folder / ".summary.json.x1y2.tmp").write_text("{")


def test_partial_files_are_reported_and_removed_by_clean_or_a_resume(tiny_config, capsys):
    from sft.analysis import main as analysis_main
    from sft.clean import main as clean_main

    folder = run(tiny_config(checkpoint_every=1, max_steps=2, keep_checkpoints_after_completion=1)).path
    complete = sorted(folder.rglob("*"))
    leave_partial_files(folder)
    capsys.readouterr()
    assert analysis_main([str(folder.parent)]) == 0
    listed = capsys.readouterr().out
    assert f"note: {folder} holds partial files that an interrupted write left: .model.tmp/ (3 MB)" in listed
    assert f"`python -m sft.clean {folder}` removes them" in listed
    run(tiny_config(max_steps=1))  # a new run in the same runs folder says so too
    assert f"note: {folder} holds partial files" in capsys.readouterr().err
    with holding_lock(folder):
        assert clean_main([str(folder)]) == 2 and "is in use" in capsys.readouterr().err
    (folder / LOCK).unlink()  # the killed holder's
    assert clean_main([str(folder)]) == 0
    assert capsys.readouterr().out.strip() == (f"{folder}: removed .model.tmp/ (3 MB), .summary.json.x1y2.tmp (0 kB), "
                                               f"checkpoints/.tmp-step-000003/ (1 kB)")
    assert leftovers(folder) == [] and sorted(folder.rglob("*")) == complete
    assert clean_main([str(folder)]) == 0 and capsys.readouterr().out.strip() == f"{folder}: no partial files"

    leave_partial_files(folder)
    (folder / "summary.json").write_text(json.dumps({"status": "running"}))  # killed during its final save
    run(tiny_config(resume=str(folder)))
    assert "note: removed the partial files that an interrupted write left: .model.tmp/ (3 MB)" in \
        capsys.readouterr().err
    assert leftovers(folder) == [] and load_run(folder).status == "completed"
