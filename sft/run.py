"""A training run from start to end: the entry point of experiment scripts (`main`) and `run`, the checks
made before anything is loaded (`check_room`, `output_bytes`), resuming (`resumed_config`,
`restore_checkpoint`), opening the run folder, and finishing it (`summary_numbers`, `finish`, `save_model`).

Every user error is raised before the run folder is created; a failure after that is recorded in the folder
(`status: failed` and the reason, `RunWriteError` for a failed write) and nothing written earlier is lost.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpoint
from .config import TrainConfig, script_spelling, settings_from
from .data import PreparedData
from .errors import ConfigError, SFTError
from .loop import Interrupted, LoopEnd, LoopState, StepResult, step_plan, train_loop, train_step
from .modeling import parameters_from_config
from .perf import mfu
from .run_folder import (HELDOUT, HELDOUT_MAX_BYTES, HELDOUT_ROWS, RunFolder, RunLock, WriteFailed, collect_env,
                         partial_files_note, read_config, remove_partial_files, require_room)
from .setup import Setup, build
from .tracking import check_available

Step = Callable[[Setup, list[dict]], StepResult]


def main(namespace: dict, *, step: Step = train_step) -> RunFolder:
    """Entry point of the experiment scripts, called as `main(globals())`: builds the config from their
    UPPER_CASE constants and runs it. User errors (a bad setting, file or row) end in one line on
    stderr, naming settings as the script spells them, and exit code 2, without a traceback. `step`: as
    in `run`."""
    try:
        # a script run as the program owns the command line (a notebook's or a `python -c` caller's does not);
        # a launcher's --local_rank is not the user's
        extra = [a for a in sys.argv[1:] if not a.startswith(("--local_rank", "--local-rank"))]
        if namespace.get("__name__") == "__main__" and "__file__" in namespace and extra:
            raise ConfigError(f"unexpected arguments {' '.join(extra)!r}: an experiment script takes none; "
                              f"its settings are the UPPER_CASE constants at its top")
        settings = settings_from(namespace)
        if "experiment" not in settings:
            raise ConfigError('EXPERIMENT: not set; every experiment script sets EXPERIMENT = "<name>", the '
                              "suffix of its run folders")
        return run(TrainConfig(**settings), step=step)
    except SFTError as e:
        print(f"error: {script_spelling(str(e))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        if isinstance(e, Interrupted) and e.checkpoint is not None:
            print(f"to continue from the checkpoint of step {e.checkpoint_step}, set in the script:\n"
                  f'RESUME = "{_shown_path(e.run_path)}"', file=sys.stderr)
        sys.exit(143 if isinstance(e, Interrupted) and e.signal == "SIGTERM" else 130)


def run(cfg: TrainConfig, data: PreparedData | None = None, *, build: Callable[..., Setup] = build,
        step: Step = train_step) -> RunFolder:
    """Builds everything, then trains into a new run folder, or into `cfg.resume`'s folder from its
    newest checkpoint (with that run's saved settings). The runs folder is checked first (writable, room
    for the outputs); a resume takes the run folder's lock before any compute is spent. `build` (setup.build)
    and `step` (loop.train_step) are the stages that load and train: tests replace them to check that nothing
    is loaded, or to inject a failure."""
    cfg = resumed_config(cfg) if cfg.resume else cfg
    check_available(cfg.report_to)
    check_room(cfg)
    lock = RunLock(Path(cfg.resume)).acquire() if cfg.resume and _main_process() else None
    _note_partial_files(cfg, lock)
    try:
        setup = build(cfg, data)
        restored = restore_checkpoint(cfg, setup) if cfg.resume else None
        folder, lock = open_run_folder(cfg, setup, lock)
        try:
            ended = train_loop(cfg, setup, folder, restored, step)
            finish(cfg, setup, folder, summary_numbers(cfg, setup, ended))
        except BaseException as e:
            _record_failure(cfg, folder, e)
        finally:
            folder.close_trackers()
    finally:
        if lock is not None:
            lock.release()
    return folder


def _note_partial_files(cfg: TrainConfig, lock: RunLock | None) -> None:
    """A resume removes its folder's partial files (it holds the lock); a new run names other runs'."""
    if lock is not None and (removed := remove_partial_files(Path(cfg.resume))):
        print(f"note: removed the partial files that an interrupted write left: {removed}", file=sys.stderr)
    elif not cfg.resume and _main_process():
        for run_config in sorted(Path(cfg.runs_root).glob("*/config.json")):  # other runs' leftovers take room
            if note := partial_files_note(run_config.parent):
                print(f"note: {note}", file=sys.stderr)


def _record_failure(cfg: TrainConfig, folder: RunFolder, e: BaseException) -> None:
    """Records why the run stopped in its summary, then raises: the signal's Interrupted, a failed write as
    one RunWriteError, anything else as it came."""
    if isinstance(e, Interrupted):
        folder.record_failure("interrupted", str(e))
        raise e
    if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C (or signal) stops at once, wherever the run was
        newest = checkpoint.checkpoints(folder.path)
        stopped = Interrupted("SIGINT", folder.path, newest[-1] if newest else None,
                              "stopped at once by a second signal")
        folder.record_failure("interrupted", str(stopped))
        raise stopped from None
    failed_write = RunWriteError.of(e, folder.path, cfg.checkpoint_every)
    folder.record_failure("failed", str(failed_write) if failed_write else f"{type(e).__name__}: {e}")
    if failed_write is not None:
        raise failed_write from e
    raise e


class RunWriteError(SFTError):
    """A write into the run folder failed after the start (a full disk, a folder gone read-only): the run is
    failed. Names the path, the room left, and what is kept: the model when saved, the newest checkpoint
    (`checkpoint`, None if there is none) to resume from."""

    def __init__(self, message: str, run_path: Path, checkpoint_path: Path | None):
        super().__init__(message)
        self.run_path, self.checkpoint = run_path, checkpoint_path

    @classmethod
    def of(cls, e: BaseException, run_path: Path, checkpoint_every: int | None) -> "RunWriteError | None":
        """The error to report for `e` when it is a failed write (None otherwise)."""
        if isinstance(e, OSError) and not isinstance(e, WriteFailed):  # figures, the card: their own paths
            e = WriteFailed(e.filename or run_path, e)
        if not isinstance(e, (WriteFailed, checkpoint.CheckpointError)):
            return None
        found = checkpoint.checkpoints(run_path)
        kept = [f"the model is saved in {_shown_path(run_path / 'model')}"] if (run_path / "model").is_dir() else []
        if found:
            step = int(found[-1].name.removeprefix(checkpoint.PREFIX))
            kept.append(f"the newest checkpoint, of step {step}, is kept: to continue from it once there is room, "
                        f'set RESUME = "{_shown_path(run_path)}" in the script')
        elif checkpoint_every:
            kept.append("no checkpoint is left to resume from")
        else:
            kept.append("no checkpoint was kept to resume from (CHECKPOINT_EVERY = N keeps one every N steps)")
        return cls(f"{e}; the run is marked failed; {'; '.join(kept)}", run_path, found[-1] if found else None)


def _main_process() -> bool:
    """Whether this is the process that writes the run folder (rank 0), known before accelerate starts."""
    return int(os.environ.get("RANK", "0")) == 0


def _shown_path(path: Path) -> str:
    """A path as a script would name it: relative to the current directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------ before the start


def output_bytes(cfg: TrainConfig, num_parameters: int, trainable: int | None = None) -> tuple[int, int]:
    """About how many bytes the final model and one checkpoint take, from the parameter counts and precision:
    the model is saved in its training dtype; a checkpoint adds AdamW's two moments (and Kahan's buffer).
    With adapters both hold the fp32 trainable weights only, and merge_adapter adds the merged model."""
    pure = cfg.precision == "bf16_pure"
    weight = 2 if pure else 4
    if cfg.finetune == "lora":
        adapter = (trainable or 0) * 4
        return adapter + (num_parameters * weight if cfg.merge_adapter else 0), adapter + (trainable or 0) * 8
    moments = {"float32": 8, "bfloat16": 4, "int8": 2}[cfg.optimizer_state_dtype] if pure else 8
    kahan = 2 if pure and cfg.bf16_update == "kahan" else 0
    return num_parameters * weight, num_parameters * (weight + moments + kahan)


def check_room(cfg: TrainConfig) -> None:
    """Before any data or model is loaded: the runs folder (or the resumed run folder) can be written and
    has room for the final model and, when checkpointing, one checkpoint. Each failure is one line."""
    root = Path(cfg.resume) if cfg.resume else Path(cfg.runs_root)
    name = "resume" if cfg.resume else "runs_root"
    existing = next(p for p in (root, *root.absolute().parents) if p.exists())  # nothing is created yet
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"{name}: {root} cannot be written ({e.strerror or e}); choose a folder you can write "
                          f"to") from None
    model_bytes, checkpoint_bytes = output_bytes(cfg, *parameters_from_config(
        cfg.model, cfg.model_revision, trust_remote_code=cfg.trust_remote_code,
        adapters=cfg if cfg.finetune == "lora" else None))
    need = (model_bytes if cfg.save_model else 0) + (checkpoint_bytes if cfg.checkpoint_every else 0)
    what = " and ".join(w for w, on in (("the final model", cfg.save_model),
                                         ("one checkpoint", cfg.checkpoint_every)) if on)
    require_room(existing, need, lambda free: ConfigError(
        f"{name}: {root} has {free / 2**30:.2f} GiB free, and {what} {'need' if ' and ' in what else 'needs'} "
        f"about {need / 2**30:.2f} GiB; free some space or write the run elsewhere"))


# ------------------------------------------------------------------------------------------------ resuming


def resumed_config(cfg: TrainConfig) -> TrainConfig:
    """The settings the interrupted run was started with; the script's other constants are ignored. A
    completed run that kept a checkpoint is extended instead when the script raises EPOCHS or MAX_STEPS:
    those two come from the script (the learning-rate schedule is then laid out over the new length)."""
    path = Path(cfg.resume)
    record = read_config(path)
    if record is None:
        raise ConfigError(f"resume: {path} is not a run folder (no config.json)")
    saved = record["config"]
    unknown = sorted(set(saved) - set(cfg.to_dict()))
    if unknown:
        raise ConfigError(f"resume: {path} was made by a version of this toolkit with settings {unknown} that this "
                          f"version does not have")
    extend = _extension(cfg, path, saved)
    saved.update(extend)
    # compared as config.json holds them (tuples as lists)
    differing = sorted(k for k, v in json.loads(json.dumps(cfg.to_dict())).items()
                       if k != "resume" and json.loads(json.dumps(saved.get(k))) != v)
    if differing:
        print(f"note: resuming with the run's saved settings; ignoring the script's {', '.join(differing)}",
              file=sys.stderr)
    return TrainConfig.from_record(saved, resume=str(path))


def _extension(cfg: TrainConfig, path: Path, saved: dict) -> dict:
    """The script's epochs and max_steps that extend a completed run ({} for a run to continue); refuses a
    resume with nothing to resume from."""
    if not _completed(path):
        if not checkpoint.checkpoints(path):
            raise ConfigError(f"resume: {path} has no complete checkpoint to resume from")
        return {}
    extend = {k: getattr(cfg, k) for k in ("epochs", "max_steps") if _longer(k, getattr(cfg, k), saved.get(k))}
    if not extend:
        raise ConfigError(f"resume: {path} has already completed; to train it further, raise EPOCHS or MAX_STEPS "
                          f"in the script")
    if not checkpoint.checkpoints(path):
        raise ConfigError(f"resume: {path} has completed and kept no checkpoint to train further from; set "
                          f"KEEP_CHECKPOINTS_AFTER_COMPLETION = 1 for runs you may extend")
    changes = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in extend.items())
    print(f"note: extending the completed run: {changes}", file=sys.stderr)
    return extend


def _completed(path: Path) -> bool:
    summary = path / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "completed"


def _longer(name: str, new, old) -> bool:
    """Whether the script's epochs or max_steps would train past the saved run's (None: no step cap)."""
    if name == "max_steps":
        return new != old and (new is None or (old is not None and new > old))
    return new > old


def restore_checkpoint(cfg: TrainConfig, setup: Setup) -> LoopState:
    """Loads the newest checkpoint into the prepared objects, before the run folder is touched, so a
    resume that cannot work leaves the interrupted run as it was; returns the loop's state at it."""
    restored = LoopState.from_record(checkpoint.load_latest(setup.accelerator, Path(cfg.resume), setup.scheduler))
    (steps, key), (now_steps, now_key) = restored.plan, step_plan(setup)
    # the same data, and as many steps, or more when a completed run is extended (the step plan of the
    # first epochs or steps does not depend on how many follow)
    if key != now_key or now_steps < steps or (now_steps > steps and not _completed(Path(cfg.resume))):
        raise ConfigError(f"resume: the data or step plan differs from the interrupted run's ({restored.plan} vs "
                          f"{step_plan(setup)}); resume needs the same data and settings")
    restored.plan = step_plan(setup)
    return restored


# ---------------------------------------------------------------------------------------------- the folder


def open_run_folder(cfg: TrainConfig, setup: Setup, lock: RunLock | None = None) -> tuple[RunFolder, RunLock | None]:
    """A new run folder (or the resumed one), known to every process, written by the main process only,
    which holds its lock (taken here for a new folder, before anything is written into it)."""
    from accelerate.utils import broadcast_object_list

    acc = setup.accelerator
    main = acc.is_main_process
    if cfg.resume:
        path = Path(cfg.resume)
    else:
        path = RunFolder.create(cfg.runs_root, cfg.experiment).path if main else None
        if main:
            lock = RunLock(path).acquire()
    if acc.num_processes > 1:
        path = broadcast_object_list([path])[0]
    folder = RunFolder(path, writable=main)
    if cfg.resume:
        _reopen(cfg, setup, folder)
    else:
        _write_start(cfg, setup, folder)
    if main:
        print(f"run folder: {path}", file=sys.stderr)
    return folder, lock


def _reopen(cfg: TrainConfig, setup: Setup, folder: RunFolder) -> None:
    """A resumed folder: this machine added to env.json, config.json rewritten when an extension changed
    the step count, and the summary running again."""
    env = json.loads((folder.path / "env.json").read_text())
    env.setdefault("resumes", []).append(collect_env(setup.accelerator.device))
    folder.write_json("env.json", env)
    if read_config(folder.path)["derived"]["optimizer_steps"] != setup.derived["optimizer_steps"]:
        folder.write_json("config.json", {"config": dict(cfg.to_dict(), resume=None), "derived": setup.derived})
    folder.update_summary(status="running", reason=None)


def _write_start(cfg: TrainConfig, setup: Setup, folder: RunFolder) -> None:
    """A new folder's first files: the settings, the environment, the data's statistics, the held-out set."""
    folder.write_json("config.json", {"config": cfg.to_dict(), "derived": setup.derived})
    folder.write_json("env.json", collect_env(setup.accelerator.device))
    folder.write_json("data_stats.json", setup.data.stats)
    names = setup.data.source_names
    if folder.write_heldout(setup.data.eval_conversations, [names[k] for k in setup.data.eval_sources]
                            if len(names) > 1 else None, setup.data.eval_tools,
                            setup.data.eval_rows) is None and folder.writable:
        print(f"note: the held-out set is over {HELDOUT_MAX_BYTES // 2**20} MiB, so the run folder keeps its "
              f"row numbers in its datasets ({HELDOUT_ROWS}), not a copy ({HELDOUT})", file=sys.stderr)
    folder.write_json("summary.json", {"status": "running"})


# ------------------------------------------------------------------------------------------------ the end


def summary_numbers(cfg: TrainConfig, setup: Setup, ended: LoopEnd) -> dict:
    """The summary's numbers of a completed loop (the original study's keys first)."""
    state, train_runtime = ended.state, ended.train_runtime
    total_steps = len(setup.steps)
    tokens_per_s = state.tokens / state.train_time if state.train_time else float("nan")
    examples = setup.derived["train_examples"] * total_steps / setup.steps_per_epoch
    return {
        "status": "completed",
        "train_runtime": round(train_runtime, 3),
        "train_samples_per_second": round(examples / train_runtime, 3),
        "train_steps_per_second": round(total_steps / train_runtime, 4),
        "train_loss": state.loss_sum / max(1, state.supervised),
        "epoch": round(total_steps / setup.steps_per_epoch, 4),
        "global_step": total_steps,
        "real_tokens": state.tokens,
        "supervised_tokens": state.supervised,
        "real_tokens_per_second": round(tokens_per_s, 2),
        "mfu": mfu(setup.derived["num_parameters"], tokens_per_s / setup.accelerator.num_processes,
                   setup.accelerator.device,
                   setup.derived["trainable_parameters"] if setup.adapter is not None else None),
        "peak_memory_gib": round(ended.peak_gib, 3),
        "peak_memory_kind": ended.peak_kind,
        "eval_time_s": round(state.eval_time, 2),
        "eval_loss_first": state.eval_first,
        "eval_loss_final": ended.eval_final,
        "task_metric_name": cfg.task_metric,
        "task_metric_before": state.metric_before,
        "task_metric_after": ended.metric_after,
        "num_parameters": setup.derived["num_parameters"],
        "trainable_parameters": setup.derived["trainable_parameters"],
    }


def finish(cfg: TrainConfig, setup: Setup, folder: RunFolder, summary: dict) -> None:
    """Completes the run folder: the summary's numbers first (a save that fails keeps them), then the model
    (gathered from all processes when sharded), the figures, and the checkpoints pruned to
    keep_checkpoints_after_completion; `completed` is written then. The model card follows, from the
    completed folder's files, and the upload (push_to_hub), whose failure leaves the run completed."""
    from .plotting import write_figures

    acc = setup.accelerator
    if folder.writable:
        folder.update_summary(**dict(summary, status="running"))
    if cfg.save_model:
        state = acc.get_state_dict(setup.loss_model)  # a collective under FSDP / ZeRO-3: every process calls it
        if folder.writable:
            state = {k.removeprefix("_orig_mod.").removeprefix("model."): v for k, v in state.items()}
            save_model(acc.unwrap_model(setup.loss_model).model, setup.tokenizer, state, folder.path / "model",
                       adapter=setup.adapter)
            if cfg.merge_adapter:
                save_merged(cfg, setup, folder.path)
    acc.wait_for_everyone()
    if not folder.writable:
        return
    write_figures(folder.path, status="completed")
    checkpoint.prune(folder.path, cfg.keep_checkpoints_after_completion)
    folder.update_summary(status="completed")
    if cfg.save_model:
        _card_and_upload(cfg, folder)
    print(f"done: {folder.path}  eval loss {summary['eval_loss_first']:.4f} -> {summary['eval_loss_final']:.4f}"
          + (f", {cfg.task_metric} {summary['task_metric_before']:.3f} -> {summary['task_metric_after']:.3f}"
             if cfg.task_metric and summary["task_metric_before"] is not None else ""), file=sys.stderr)


def _card_and_upload(cfg: TrainConfig, folder: RunFolder) -> None:
    """The completed run's model card, then its upload when push_to_hub names a repository."""
    from .card import write_card
    from .hub import push_run

    print(f"model card: {write_card(folder.path)}", file=sys.stderr)
    if cfg.push_to_hub:
        pushed = push_run(folder.path, cfg.push_to_hub, cfg.push_private, cfg.push_revision)
        folder.update_summary(push_to_hub=pushed)
        print(f"uploaded to {pushed['url']}" if pushed["status"] == "uploaded" else
              f"note: the run is complete, but uploading to {cfg.push_to_hub} failed: {pushed['reason']}; "
              f"retry with: {pushed['retry']}", file=sys.stderr)


def save_merged(cfg: TrainConfig, setup: Setup, run_path: Path) -> None:
    """model_merged/: the base with the saved adapter merged into its weights, in the training dtype, for
    serving without peft. Built on the CPU from the saved adapter, so it is what model/ holds."""
    from .lora import merged_model

    dtype = torch.bfloat16 if setup.derived["precision"] == "bf16_pure" or cfg.load_in_4bit else torch.float32
    merged = merged_model(run_path / "model", dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    save_model(merged, setup.tokenizer, merged.state_dict(), run_path / "model_merged")


def save_model(model, tokenizer, state: dict, path: Path, adapter=None) -> None:
    """Writes the model (with `adapter`, the PeftModel of an adapter run: the adapter's files only) and the
    tokenizer under a temporary name and renames the folder when complete: `model/` is a whole model or
    absent, never a few files of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"saving the model to {path} ...", file=sys.stderr)
    began = time.perf_counter()
    try:
        if adapter is not None:
            from .lora import save_adapter

            save_adapter(adapter, state, tmp)
        else:
            model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)  # a resumed or extended run replaces its earlier model
        tmp.rename(path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # safetensors' own I/O errors
            raise WriteFailed(path, e) from e
        raise
    print(f"saved the model ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
