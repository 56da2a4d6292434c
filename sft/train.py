"""The training loop: from a validated config to a complete run folder.

Setup happens in small named steps (precision, tokenizer, data, model, optimizer, schedule); the loop
itself is `train_loop`. Every user error is raised before the run folder is created; a failure after
that is recorded in the folder (`status: failed` and the reason) and nothing written earlier is lost.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .config import TrainConfig, script_spelling, settings_from
from .data import PreparedData, example_lengths, prepare_data, set_aside
from .errors import ConfigError, SFTError
from .generation import Decoding, generate_replies, task_metric
from .loss import LossModel, host_indices, resolve_loss_impl
from .modeling import (check_packing_support, compile_layers, convert_to_float8, count_parameters,
                       enable_activation_checkpointing, float8_unavailable, load_model, load_tokenizer,
                       parameters_from_config, read_model_config, require_torchao)
from .optim import (StepInBackward, build_optimizer, describe_optimizer, master_weights_for,
                    param_groups_for_weight_decay)
from .packing import MicroBatch, collate_padded, collated_steps, packing_efficiency, plan_steps
from .perf import mfu, peak_memory, reset_peak_memory, synchronize
from .run_folder import (HELDOUT, HELDOUT_MAX_BYTES, HELDOUT_ROWS, RunFolder, RunLock, WriteFailed, collect_env,
                         partial_files_note, remove_partial_files)
from .template_traits import traits as template_traits
from .templates import IGNORE_INDEX, prompt_and_reference, render, setup_template, system_prompt_record
from .tracking import Trackers, check_available

class TrainingError(SFTError):
    """Training cannot go on (for example, the loss is no longer finite)."""


@dataclass
class Setup:
    accelerator: object
    tokenizer: object
    data: PreparedData
    model: torch.nn.Module
    loss_model: LossModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps: list[list[MicroBatch]]  # each optimizer step's micro-batches, as plans over data.train
    eval_batches: list[tuple[int, dict]]  # (dataset index, collated held-out examples of that dataset)
    derived: dict
    in_backward: StepInBackward | None = None  # set when the optimizer steps inside the backward pass
    offload: bool = False  # activations saved for the backward pass wait in pinned host memory
    max_grad_norm: float | None = None  # gradients clipped to this norm (None: not clipped)
    steps_per_epoch: int = 1  # optimizer steps in an epoch (a logged record's epoch is step / steps_per_epoch)

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[list[dict]]:
        """Steps `start` to `stop` as collated micro-batches, prepared a few steps ahead in the background."""
        return collated_steps(self.steps[start:stop], self.data.train, self.tokenizer.pad_token_id,
                              pin_memory=self.accelerator.device.type == "cuda")


def main(namespace: dict) -> RunFolder:
    """Entry point of the experiment scripts, called as `main(globals())`: builds the config from their
    UPPER_CASE constants and runs it. User errors (a bad setting, file or row) end in one line on
    stderr, naming settings as the script spells them, and exit code 2, without a traceback."""
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
        return run(TrainConfig(**settings))
    except SFTError as e:
        print(f"error: {script_spelling(str(e))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        if isinstance(e, Interrupted) and e.checkpoint is not None:
            print(f"to continue from the checkpoint of step {e.checkpoint_step}, set in the script:\n"
                  f'RESUME = "{_shown_path(e.run_path)}"', file=sys.stderr)
        sys.exit(143 if isinstance(e, Interrupted) and e.signal == "SIGTERM" else 130)


def run(cfg: TrainConfig, data: PreparedData | None = None) -> RunFolder:
    """Builds everything, then trains into a new run folder, or into `cfg.resume`'s folder from its
    newest checkpoint (with that run's saved settings). The runs folder is checked first (writable, room
    for the outputs); a resume takes the run folder's lock before any compute is spent."""
    cfg = resumed_config(cfg) if cfg.resume else cfg
    check_available(cfg.report_to)
    check_room(cfg)
    lock = RunLock(Path(cfg.resume)).acquire() if cfg.resume and _main_process() else None
    if lock is not None and (removed := remove_partial_files(Path(cfg.resume))):
        print(f"note: removed the partial files that an interrupted write left: {removed}", file=sys.stderr)
    elif not cfg.resume and _main_process():
        for run_config in sorted(Path(cfg.runs_root).glob("*/config.json")):  # other runs' leftovers take room
            if note := partial_files_note(run_config.parent):
                print(f"note: {note}", file=sys.stderr)
    try:
        setup = build(cfg, data)
        restored = restore_checkpoint(cfg, setup) if cfg.resume else None
        folder, lock = open_run_folder(cfg, setup, lock)
        try:
            summary = train_loop(cfg, setup, folder, restored)
            finish(cfg, setup, folder, summary)
        except Interrupted as e:
            folder.record_failure("interrupted", str(e))
            raise
        except KeyboardInterrupt:  # a second Ctrl-C (or signal) stops at once, wherever the run was
            newest = checkpoint.checkpoints(folder.path)
            e = Interrupted("SIGINT", folder.path, newest[-1] if newest else None, "stopped at once by a second signal")
            folder.record_failure("interrupted", str(e))
            raise e from None
        except BaseException as e:
            failed_write = RunWriteError.of(e, folder.path, cfg.checkpoint_every)
            folder.record_failure("failed", str(failed_write) if failed_write else f"{type(e).__name__}: {e}")
            if failed_write is not None:
                raise failed_write from e
            raise
        finally:
            folder.close_trackers()
    finally:
        if lock is not None:
            lock.release()
    return folder


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


def output_bytes(cfg: TrainConfig, num_parameters: int) -> tuple[int, int]:
    """About how many bytes the final model and one checkpoint take, from the parameter count and precision:
    the model is saved in its training dtype; a checkpoint adds AdamW's two moments (and Kahan's buffer)."""
    pure = cfg.precision == "bf16_pure"
    weight = 2 if pure else 4
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
    model_bytes, checkpoint_bytes = output_bytes(cfg, parameters_from_config(
        cfg.model, cfg.model_revision, trust_remote_code=cfg.trust_remote_code))
    need = (model_bytes if cfg.save_model else 0) + (checkpoint_bytes if cfg.checkpoint_every else 0)
    free = shutil.disk_usage(existing).free
    if need > free:
        what = " and ".join(w for w, on in (("the final model", cfg.save_model),
                                             ("one checkpoint", cfg.checkpoint_every)) if on)
        raise ConfigError(f"{name}: {root} has {free / 2**30:.2f} GiB free, and {what} "
                          f"{'need' if ' and ' in what else 'needs'} about "
                          f"{need / 2**30:.2f} GiB; free some space or write the run elsewhere")


def step_plan(setup: "Setup") -> list:
    """What a checkpoint's data position means: the number of steps and the tokenized data's key."""
    return [len(setup.steps), setup.data.stats.get("tokenization_cache", {}).get("key")]


def restore_checkpoint(cfg: TrainConfig, setup: "Setup") -> "LoopState":
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


def _completed(path: Path) -> bool:
    summary = path / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "completed"


def resumed_config(cfg: TrainConfig) -> TrainConfig:
    """The settings the interrupted run was started with; the script's other constants are ignored. A
    completed run that kept a checkpoint is extended instead when the script raises EPOCHS or MAX_STEPS:
    those two come from the script (the learning-rate schedule is then laid out over the new length)."""
    path = Path(cfg.resume)
    if not (path / "config.json").exists():
        raise ConfigError(f"resume: {path} is not a run folder (no config.json)")
    saved = json.loads((path / "config.json").read_text())["config"]
    unknown = sorted(set(saved) - set(cfg.to_dict()))
    if unknown:
        raise ConfigError(f"resume: {path} was made by a version of this toolkit with settings {unknown} that this "
                          f"version does not have")
    extend = {}
    if _completed(path):
        extend = {k: getattr(cfg, k) for k in ("epochs", "max_steps") if _longer(k, getattr(cfg, k), saved.get(k))}
        if not extend:
            raise ConfigError(f"resume: {path} has already completed; to train it further, raise EPOCHS or MAX_STEPS "
                              f"in the script")
        if not checkpoint.checkpoints(path):
            raise ConfigError(f"resume: {path} has completed and kept no checkpoint to train further from; set "
                              f"KEEP_CHECKPOINTS_AFTER_COMPLETION = 1 for runs you may extend")
        changes = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in extend.items())
        print(f"note: extending the completed run: {changes}",
              file=sys.stderr)
    elif not checkpoint.checkpoints(path):
        raise ConfigError(f"resume: {path} has no complete checkpoint to resume from")
    saved.update(extend)
    # compared as config.json holds them (tuples as lists)
    differing = sorted(k for k, v in json.loads(json.dumps(cfg.to_dict())).items()
                       if k != "resume" and json.loads(json.dumps(saved.get(k))) != v)
    if differing:
        print(f"note: resuming with the run's saved settings; ignoring the script's {', '.join(differing)}",
              file=sys.stderr)
    return TrainConfig.from_record(saved, resume=str(path))


def _longer(name: str, new, old) -> bool:
    """Whether the script's epochs or max_steps would train past the saved run's (None: no step cap)."""
    if name == "max_steps":
        return new != old and (new is None or (old is not None and new > old))
    return new > old


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
        env = json.loads((path / "env.json").read_text())
        env.setdefault("resumes", []).append(collect_env(acc.device))
        folder.write_json("env.json", env)
        if folder.read_json("config.json")["derived"]["optimizer_steps"] != setup.derived["optimizer_steps"]:
            folder.write_json("config.json", {"config": dict(cfg.to_dict(), resume=None), "derived": setup.derived})
        folder.update_summary(status="running", reason=None)
    else:
        folder.write_json("config.json", {"config": cfg.to_dict(), "derived": setup.derived})
        folder.write_json("env.json", collect_env(acc.device))
        folder.write_json("data_stats.json", setup.data.stats)
        names = setup.data.source_names
        if folder.write_heldout(setup.data.eval_conversations, [names[k] for k in setup.data.eval_sources]
                                if len(names) > 1 else None, setup.data.eval_tools,
                                setup.data.eval_rows) is None and main:
            print(f"note: the held-out set is over {HELDOUT_MAX_BYTES // 2**20} MiB, so the run folder keeps its "
                  f"row numbers in its datasets ({HELDOUT_ROWS}), not a copy ({HELDOUT})", file=sys.stderr)
        folder.write_json("summary.json", {"status": "running"})
    if main:
        print(f"run folder: {path}", file=sys.stderr)
    return folder, lock


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        if cfg.precision != "fp32" and device.type == "cpu":
            print(f"note: precision={cfg.precision} on the CPU is correct but slow without bf16 instructions",
                  file=sys.stderr)
        return cfg.precision
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return "bf16_autocast" if bf16_ok else "fp32"


def resolve_attention(cfg: TrainConfig, device: torch.device, precision: str, model_type: str) -> str | None:
    """The attention implementation to load the model with; None lets transformers pick its default
    (sdpa where the architecture supports it, eager otherwise). MPT loads with its own (eager) attention,
    which sft.mpt_attention replaces once it is loaded."""
    if model_type == "mpt":
        from .mpt_attention import choose_kind
        choose_kind(cfg.attn_implementation, device)  # refuses what MPT cannot run, before the model loads
        return None
    if cfg.attn_implementation != "auto":
        if cfg.attn_implementation == "varlen":
            from .attention import register_varlen_attention
            return register_varlen_attention(device)
        return cfg.attn_implementation
    if device.type == "cuda" and (cfg.packing or cfg.padding_free) and precision != "fp32":
        from .attention import register_varlen_attention, varlen_available
        if varlen_available(device):
            return register_varlen_attention(device)
    return None


def build(cfg: TrainConfig, data: PreparedData | None = None) -> Setup:
    """Everything the loop needs. `data` replaces the dataset named in the config (benchmarks feed
    synthetic token ids this way)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    probe = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg, probe)
    # cpu=True on a machine without CUDA lets processes started by `accelerate launch` (torch.distributed.run)
    # join one gloo process group instead of each training alone.
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16_autocast" else "no",
                              cpu=probe.type == "cpu")
    device = accelerator.device
    master = master_weights_for(precision, cfg.bf16_update)
    zero3 = check_runtime(cfg, accelerator, master)

    float8 = cfg.float8 and precision != "fp32" and float8_unavailable(device) is None
    if float8:
        require_torchao()
    elif cfg.float8 and accelerator.is_main_process:
        print(f"note: float8: {float8_unavailable(device) or 'fp32 precision'}; the matmuls stay in "
              f"{'bf16' if precision != 'fp32' else 'fp32'}", file=sys.stderr)

    tokenizer = load_tokenizer(cfg.model, cfg.model_revision, cfg.trust_remote_code, cfg.eos_token)
    template = setup_template(tokenizer, cfg.template, cfg.system_prompt, cfg.reasoning_tags)
    system_prompt, system_note = system_prompt_record(tokenizer, cfg.system_prompt)
    if data is None:
        data = prepare_data(cfg, tokenizer)
        if accelerator.is_main_process:
            for line in set_aside(data.stats):
                print(f"note: {line}", file=sys.stderr)
    if system_note and accelerator.is_main_process:  # after the data: an error in it stays the only line
        print(f"note: {system_note}", file=sys.stderr)

    world = accelerator.num_processes
    lengths = example_lengths(data.train)
    steps, steps_per_epoch = plan_steps(  # plans; collated as training reaches them (Setup.batches)
        lengths, epochs=cfg.epochs, micro_batches_per_step=cfg.grad_accum_steps * world, seed=cfg.seed,
        max_steps=cfg.max_steps, packing=cfg.packing, rows_per_batch=cfg.micro_batch_size, row_length=cfg.max_length,
        group_by_length=cfg.group_by_length, padding_free=cfg.padding_free)
    if cfg.warmup_ratio > 0 and warmup_steps(cfg, len(steps)) >= len(steps):
        raise ConfigError(f"warmup_ratio: {cfg.warmup_ratio} of this run's {len(steps)} optimizer steps is "
                          f"{warmup_steps(cfg, len(steps))} warmup steps, so the learning rate would never reach "
                          f"lr; lower warmup_ratio or train for more steps")
    eval_batches = held_out_batches(data, cfg.eval_batch_size, tokenizer.pad_token_id)

    set_seed(cfg.seed)
    model_type = read_model_config(cfg.model, cfg.model_revision, cfg.trust_remote_code).model_type
    attention = resolve_attention(cfg, device, precision, model_type)
    dtype = torch.bfloat16 if precision == "bf16_pure" else torch.float32
    model = load_model(cfg.model, cfg.model_revision, dtype=dtype, attn_implementation=attention,
                       trust_remote_code=cfg.trust_remote_code, device=device)
    attention_used = model.config._attn_implementation
    if model_type == "mpt":
        from .mpt_attention import choose_kind, install
        if kind := choose_kind(cfg.attn_implementation, device):
            attention_used = install(model, kind)
    if cfg.packing or cfg.padding_free:
        check_packing_support(model)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model, cfg.checkpoint_every_n_layers)
    if float8:
        convert_to_float8(model)
    loss_impl = resolve_loss_impl(model, cfg.loss_impl, partitioned_weights=zero3)
    loss_model = LossModel(model, loss_impl, cfg.loss_chunk_tokens).to(device)
    optimizer = build_optimizer(param_groups_for_weight_decay(model, cfg.weight_decay), master_weights=master,
                                lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay, seed=cfg.seed, state_dtype=cfg.optimizer_state_dtype,
                                kernel=cfg.optimizer_kernel)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(steps)))
    if cfg.compile:
        compile_layers(model, cfg.compile_mode)
    num_parameters = count_parameters(model)  # before prepare: DeepSpeed ZeRO-3 leaves each process a shard
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    in_backward = StepInBackward(inner_optimizer) if cfg.optimizer_in_backward else None

    derived = run_description(cfg, accelerator, data, model, inner_optimizer, in_backward is not None, steps,
                              steps_per_epoch, lengths, precision=precision, master_weights=master,
                              attn_implementation=attention_used, float8=float8, loss_impl=loss_impl, template=template,
                              system_prompt=system_prompt, chat_template=template_traits(tokenizer).record(),
                              num_parameters=num_parameters)
    data.stats["packing_efficiency"] = derived["packing_efficiency"]
    return Setup(accelerator, tokenizer, data, model, loss_model, optimizer, scheduler, steps, eval_batches, derived,
                 in_backward, cfg.activation_offload, cfg.max_grad_norm, steps_per_epoch)


def check_runtime(cfg: TrainConfig, accelerator, master: str) -> bool:
    """Refuses the settings that the process layout (FSDP, DeepSpeed, several processes) cannot run, before
    anything is loaded; returns whether DeepSpeed ZeRO-3 partitions the weights."""
    kind = accelerator.distributed_type.name
    if kind == "FSDP" and master != "fp32":
        raise ConfigError("FSDP shards parameters as DTensors, which BF16AdamW's bf16 update does not handle: use "
                          "precision='bf16_autocast' (fp32 master weights) with FSDP, or 'bf16_pure' on one GPU or DDP")
    if cfg.optimizer_in_backward and accelerator.num_processes > 1:
        raise ConfigError(f"optimizer_in_backward: with {accelerator.num_processes} processes the gradients are "
                          f"averaged across processes after each one's backward pass, too late for a step inside "
                          f"it; run it in one process")
    if kind == "DEEPSPEED" and (cfg.grad_accum_steps != 1 or master != "fp32"):
        raise ConfigError("DeepSpeed steps the optimizer inside every backward pass and keeps its own fp32 master "
                          "weights: use grad_accum_steps=1 (raise micro_batch_size or the process count) and "
                          "precision='bf16_autocast' or 'fp32'")
    return kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3


def run_description(cfg: TrainConfig, accelerator, data: PreparedData, model, optimizer, in_backward: bool,
                    steps: list, steps_per_epoch: int, lengths: list[int], **resolved) -> dict:
    """What the run resolved and planned, for config.json's `derived` record (read by people and by the
    analysis, never by the loop): the settings `auto` became, the optimizer, the step plan and the data's size."""
    world = accelerator.num_processes
    return {**resolved,
            "optimizer": describe_optimizer(optimizer) + (", stepped per parameter in the backward pass"
                                                          if in_backward else ""),
            "max_grad_norm": cfg.max_grad_norm, "model_commit": getattr(model.config, "_commit_hash", None),
            "device": str(accelerator.device), "world_size": world, "optimizer_steps": len(steps),
            "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup_steps(cfg, len(steps)),
            "micro_batches_per_step": cfg.grad_accum_steps * world,
            "rows_per_optimizer_step": cfg.micro_batch_size * cfg.grad_accum_steps * world,
            "train_examples": len(data.train), "eval_examples": len(data.eval),
            "multi_turn": {split: data.stats.get(split, {}).get("multi_turn") for split in ("train", "eval")},
            "packing_efficiency": round(packing_efficiency([b for s in steps for b in s], lengths), 4)}


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return round(cfg.warmup_ratio * total)


def lr_lambda(cfg: TrainConfig, total: int):
    """Linear warmup, then decay that reaches `min_lr_ratio` exactly after the last real step."""
    warm = warmup_steps(cfg, total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        if cfg.lr_schedule == "constant":
            return 1.0
        if cfg.lr_schedule == "linear":
            return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """The micro-batch's tensors on the device, with the loss's index tensors made on the host first."""
    batch = dict(batch, **host_indices(batch))
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _num_supervised(batch: dict) -> int:
    return int((batch["targets"] != IGNORE_INDEX).sum())


class StepResult(NamedTuple):
    """What one optimizer step did, summed over its micro-batches and processes."""
    loss_sum: float   # the token losses, summed
    supervised: int   # the supervised tokens: the loss's denominator
    grad_norm: float  # before clipping
    real_tokens: int  # tokens that are not padding

    @property
    def loss(self) -> float:
        return self.loss_sum / self.supervised


def train_step(setup: Setup, step_batches: list[dict]) -> StepResult:
    """One optimizer step over the global step's micro-batches.

    Each process takes its share of the micro-batches. Each token loss is divided by the supervised
    tokens of the WHOLE step (every micro-batch of every process) and multiplied by the world size,
    because data-parallel wrappers average gradients over processes: the update then equals that of
    one batch holding all the step's tokens, however it is split.
    """
    acc, world = setup.accelerator, setup.accelerator.num_processes
    total_supervised = sum(_num_supervised(b) for b in step_batches)
    share = my_share(len(step_batches), acc)  # a short last step pads with zero-weight repeats
    loss_sum = torch.zeros((), device=acc.device)
    for k, (i, counts) in enumerate(share):
        weight = 1.0 if counts else 0.0
        sync = k == len(share) - 1
        with (acc.no_sync(setup.loss_model) if not sync else contextlib.nullcontext()), offloaded(setup):
            loss = setup.loss_model(**batch_to_device(step_batches[i], acc.device))
            acc.backward(loss * (weight * world / total_supervised))
        loss_sum += loss.detach() * weight
    if setup.in_backward is not None:  # every parameter has already stepped, inside the backward pass
        grad_norm = setup.in_backward.grad_norm()
    else:
        grad_norm = acc.clip_grad_norm_(setup.loss_model.parameters(), setup.max_grad_norm or math.inf)
        grad_norm = float("nan") if grad_norm is None else grad_norm  # DeepSpeed clips inside its engine
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
    setup.scheduler.step()
    loss_sum = acc.reduce(loss_sum, reduction="sum") if world > 1 else loss_sum
    real_tokens = sum(b["num_real_tokens"] for b in step_batches)
    return StepResult(loss_sum.item(), total_supervised, float(grad_norm), real_tokens)


def offloaded(setup: Setup):
    """With activation_offload, every tensor the forward pass saves for the backward pass is copied to
    (pinned, on GPUs) host memory as it is saved, and back when the backward pass needs it."""
    if not setup.offload:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=setup.accelerator.device.type == "cuda")


def my_share(n: int, acc) -> list[tuple[int, bool]]:
    """This process's share of n items, as (index, counts). Every process gets the same number of items,
    padding with repeats that do not count: wrapped models run collectives in each forward pass (DDP
    buffer broadcasts, FSDP all-gathers), so every process must run as many forward passes."""
    per_process = -(-n // acc.num_processes)
    mine = list(range(acc.process_index, n, acc.num_processes))
    return [(i, True) for i in mine] + [(0, False)] * (per_process - len(mine)) if n else []


def held_out_batches(data: PreparedData, batch_size: int, pad_id: int) -> list[tuple[int, dict]]:
    """The held-out examples of each dataset, sorted by length (little padding) and collated in batches."""
    by_source: dict[int, list] = {}
    for i, example in enumerate(data.eval):
        by_source.setdefault(data.eval_sources[i] if data.eval_sources else 0, []).append(example)
    batches = []
    for k, examples in sorted(by_source.items()):
        examples.sort(key=lambda e: len(e.input_ids))
        batches += [(k, collate_padded(examples[j:j + batch_size], pad_id))
                    for j in range(0, len(examples), batch_size)]
    return batches


def evaluate_loss(setup: Setup) -> tuple[float, dict[str, float] | None]:
    return held_out_losses(setup.accelerator, setup.loss_model, setup.eval_batches, setup.data.source_names)


@torch.no_grad()
def held_out_losses(acc, loss_model, batches: list[tuple[int, dict]],
                    names: list[str]) -> tuple[float, dict[str, float] | None]:
    """Token-weighted mean loss over held-out batches (all processes together), and per dataset when there
    are several (`names`, indexed by each batch's dataset)."""
    was_training = loss_model.training
    loss_model.eval()
    names = names or ["all"]
    total = torch.zeros(len(names), 2, device=acc.device, dtype=torch.float64)  # summed loss, targets
    share = my_share(len(batches), acc)
    with tqdm(share, desc="eval loss", leave=False, unit="batch", disable=not acc.is_local_main_process,
              dynamic_ncols=True) as bar:  # closed on an error too, before it is printed
        for i, counts in bar:
            source, batch = batches[i]
            loss = loss_model(**batch_to_device(batch, acc.device))
            if counts:  # summed on the device: no host sync per batch
                total[source, 0] += loss.double()
                total[source, 1] += _num_supervised(batch)
    loss_model.train(was_training)
    if acc.num_processes > 1:
        total = acc.reduce(total, reduction="sum")
    total = total.tolist()

    def mean(loss: float, targets: float) -> float:
        return loss / targets if targets > 0 else float("nan")

    overall = mean(sum(t[0] for t in total), sum(t[1] for t in total))
    return overall, ({name: mean(*t) for name, t in zip(names, total)} if len(names) > 1 else None)


def generation_pass(cfg: TrainConfig, setup: Setup, stage: str, folder: RunFolder, step: int) -> float | None:
    """Generates for the held-out prompts; writes samples and returns the task metric (or None)."""
    from accelerate.utils import gather_object

    n = max(cfg.num_samples, cfg.task_metric_rows if cfg.task_metric else 0)
    conversations = setup.data.eval_conversations[:n]
    if not conversations:
        return None
    acc = setup.accelerator
    prompts, references = zip(*(prompt_and_reference(c, cfg.task_metric) for c in conversations))
    tools = (setup.data.eval_tools or [None] * len(conversations))[:n]
    decoding = Decoding(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.seed)
    model = acc.unwrap_model(setup.loss_model).model
    share = my_share(len(prompts), acc)
    sharded = acc.num_processes > 1 and acc.distributed_type.name in ("FSDP", "DEEPSPEED")
    with acc.autocast():  # the inner model is not wrapped by accelerate's autocast; training's forward is
        replies = generate_replies(model, setup.tokenizer, [prompts[i] for i, _ in share], decoding,
                                   cfg.generation_batch_size, synced=sharded,
                                   progress=f"generating ({stage or 'eval'})" if acc.is_local_main_process else None,
                                   tools=[tools[i] for i, _ in share])
    gathered = dict(gather_object([(i, r) for (i, counts), r in zip(share, replies) if counts]))
    replies = [gathered[i] for i in range(len(prompts))]
    if folder.writable:
        folder.append_samples(stage, step, [
            {"stage": stage, "index": i, "messages": list(prompts[i]), **({"tools": tools[i]} if tools[i] else {}),
             "prompt": render(setup.tokenizer, list(prompts[i]), True, tools[i]), **replies[i].record(),
             "reference": references[i], "decoding": decoding.record()}
            for i in range(min(cfg.num_samples, len(prompts)))])
    if not cfg.task_metric:
        return None
    k = min(cfg.task_metric_rows, len(prompts))
    return task_metric(cfg.task_metric, replies[:k], list(references[:k]))


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the run: after the current step, with a checkpoint saved, or at once on a
    second signal. Carries the signal, the run folder and its newest checkpoint (None if there is none)."""

    def __init__(self, signal_name: str, run_path: Path, checkpoint_path: Path | None, what: str):
        self.signal, self.run_path, self.checkpoint = signal_name, Path(run_path), checkpoint_path
        self.checkpoint_step = int(checkpoint_path.name.removeprefix(checkpoint.PREFIX)) if checkpoint_path else None
        saved = (f"newest checkpoint: step {self.checkpoint_step} ({checkpoint_path})" if checkpoint_path
                 else "no checkpoint saved")
        super().__init__(f"{signal_name}: {what}; {saved}")


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each optimizer step, so a preempted job
    ends on a step boundary with a checkpoint instead of dying mid-step."""

    def __init__(self, announce: bool = True):
        self.signal: str | None = None
        self.previous: dict = {}
        self.announce = announce

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if self.announce:
            tqdm.write(f"\n{self.signal} received: finishing the current step, then saving a checkpoint; "
                       f"press Ctrl-C again to stop at once, without saving", file=sys.stderr)

    def requested(self, acc) -> bool:
        """True on every process once any process got a signal: the checkpoint save is collective."""
        if acc.num_processes == 1:
            return self.signal is not None
        flag = torch.tensor(float(self.signal is not None), device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


@dataclass
class Window:
    """What the loop adds up between two logged records."""
    loss_sum: float = 0.0
    supervised: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, done: StepResult, seconds: float) -> None:
        self.loss_sum += done.loss_sum
        self.supervised += done.supervised
        self.tokens += done.real_tokens
        self.seconds += seconds


@dataclass
class LoopState:
    """Everything the loop accumulates; a checkpoint carries it across a resume (trainer_state.json)."""
    plan: list  # step_plan: what the data position means, checked on resume
    step: int = 0
    tokens: int = 0  # real tokens trained on
    supervised: int = 0  # supervised tokens
    loss_sum: float = 0.0  # their token losses, summed
    train_time: float = 0.0  # seconds in train_step
    eval_time: float = 0.0  # seconds in held-out evaluation and generation
    elapsed: float = 0.0  # seconds since the run started, up to the checkpoint
    train_wall: float = 0.0  # wall seconds of the loop, up to the checkpoint
    eval_first: float | None = None
    metric_before: float | None = None
    window: Window = field(default_factory=Window)
    # this process's clocks, not saved: when it took the state over, and when its first step began
    opened: float = field(default_factory=time.perf_counter, compare=False, metadata={"saved": False})
    loop_began: float | None = field(default=None, compare=False, metadata={"saved": False})

    def add(self, done: StepResult, seconds: float) -> None:
        self.step += 1
        self.tokens += done.real_tokens
        self.supervised += done.supervised
        self.loss_sum += done.loss_sum
        self.train_time += seconds
        self.window.add(done, seconds)

    def elapsed_now(self) -> float:
        """Seconds since the run started, over resumes."""
        return round(self.elapsed + time.perf_counter() - self.opened, 2)

    def loop_wall_now(self) -> float:
        """Wall seconds of the training loop, over resumes."""
        return self.train_wall + (time.perf_counter() - self.loop_began if self.loop_began is not None else 0.0)

    def record(self) -> dict:
        """The state as a checkpoint saves it (trainer_state.json), with the clocks read now."""
        saved = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("saved", True)}
        return {**saved, "window": asdict(self.window), "elapsed": self.elapsed_now(),
                "train_wall": self.loop_wall_now()}

    @classmethod
    def from_record(cls, record: dict) -> "LoopState":
        """From trainer_state.json, including the names of earlier versions (targets, loss_x_targets, time)."""
        renamed = {"targets": "supervised", "loss_x_targets": "loss_sum", "time": "seconds"}
        window = {renamed.get(k, k): v for k, v in record["window"].items()}
        return cls(**{**{renamed.get(k, k): v for k, v in record.items()}, "window": Window(**window)})


def log_evaluation(cfg: TrainConfig, setup: Setup, folder: RunFolder, state: LoopState, step: int, stage: str | None,
                   ) -> tuple[float, float | None]:
    """The held-out loss (and, at a `stage` "before" or "after", the generation pass with its task metric),
    logged to metrics.jsonl and the console; its time counts as evaluation time."""
    t = time.perf_counter()
    eval_loss, by_source = evaluate_loss(setup)
    metric = generation_pass(cfg, setup, stage, folder, step) if stage is not None else None
    state.eval_time += time.perf_counter() - t
    folder.append_metrics({
        "kind": "eval", "step": step, "epoch": round(step / setup.steps_per_epoch, 4), "tokens": state.tokens,
        "eval_loss": eval_loss, **({"eval_loss_by_source": by_source} if by_source else {}),
        "task_metric": metric, "task_metric_name": cfg.task_metric, "elapsed_s": state.elapsed_now()})
    if setup.accelerator.is_main_process:
        tqdm.write(f"step {step}: eval loss {eval_loss:.4f}"
                   + (" (" + ", ".join(f"{k} {v:.4f}" for k, v in by_source.items()) + ")" if by_source else "")
                   + (f", {cfg.task_metric} {metric:.3f}" if metric is not None else ""), file=sys.stderr)
    return eval_loss, metric


def save_checkpoint(cfg: TrainConfig, setup: Setup, folder: RunFolder, state: LoopState) -> Path:
    """A checkpoint of the step the loop has reached, with the loop's state."""
    path = checkpoint.save(setup.accelerator, folder.path, state.step, state.record(), setup.scheduler,
                           cfg.keep_checkpoints, checkpoint.state_bytes(setup.loss_model, setup.optimizer))
    if setup.accelerator.is_main_process:
        tqdm.write(f"step {state.step}: checkpoint saved ({path.name})", file=sys.stderr)
    return path


def train_loop(cfg: TrainConfig, setup: Setup, folder: RunFolder, restored: LoopState | None = None) -> dict:
    """The optimizer steps of the run (from a checkpoint's state when `restored`), with the held-out
    evaluations before, every eval_every steps and after, logging, checkpoints and the stop on a signal;
    returns the summary's numbers."""
    acc = setup.accelerator
    total_steps = len(setup.steps)
    state = restored or LoopState(plan=step_plan(setup))
    if folder.writable and cfg.report_to:
        folder.trackers = Trackers(cfg.report_to, folder.path, folder.path.name, cfg.to_dict(),
                                   resume_step=restored.step if restored is not None else None)
    if restored is not None:
        folder.truncate_metrics(state.step)
        folder.drop_samples("after")  # a crash during the final generation pass may have left some
        print(f"resumed at step {state.step} of {total_steps}", file=sys.stderr)
    else:
        state.eval_first, state.metric_before = log_evaluation(cfg, setup, folder, state, 0, "before")
    # from_pretrained returns a model in eval mode, where transformers skips activation checkpointing and
    # dropout; a resumed run has no step-0 evaluation that would happen to leave it in training mode.
    setup.loss_model.train()
    reset_peak_memory(acc.device)
    state.loop_began = time.perf_counter()
    bar = tqdm(total=total_steps, initial=state.step, desc=cfg.experiment, disable=not acc.is_local_main_process,
               dynamic_ncols=True)
    with StopRequest(announce=acc.is_main_process) as stop, bar:  # the bar closes before any error is printed
        for step_batches in setup.batches(state.step):
            step = state.step + 1
            lr = setup.scheduler.get_last_lr()[0]
            t = time.perf_counter()
            done = train_step(setup, step_batches)
            synchronize(acc.device)
            dt = time.perf_counter() - t
            if not math.isfinite(done.loss):
                raise TrainingError(f"the training loss became {done.loss} at step {step}; lower lr or check the data"
                                    + ("; the last good checkpoint is kept" if cfg.checkpoint_every else ""))
            state.add(done, dt)
            if step % cfg.log_every == 0 or step == total_steps:
                window = state.window
                tps, mean_loss = window.tokens / window.seconds, window.loss_sum / window.supervised
                folder.append_metrics({
                    "kind": "train", "step": step, "epoch": round(step / setup.steps_per_epoch, 4),
                    "loss": mean_loss, "lr": lr, "grad_norm": done.grad_norm, "tokens": state.tokens,
                    "supervised_tokens": state.supervised, "tokens_per_s": tps, "elapsed_s": state.elapsed_now()})
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                state.window = Window()
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps:
                log_evaluation(cfg, setup, folder, state, step, None)
            if stop.requested(acc):
                path = save_checkpoint(cfg, setup, folder, state)
                raise Interrupted(stop.signal or "a signal on another process", folder.path, path,
                                  f"stopped after step {step}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != total_steps:
                save_checkpoint(cfg, setup, folder, state)
    if cfg.keep_checkpoints_after_completion and state.step == total_steps and not any(
            p.name == f"{checkpoint.PREFIX}{total_steps:06d}" for p in checkpoint.checkpoints(folder.path)):
        save_checkpoint(cfg, setup, folder, state)  # the final step's: training can be extended from it
    train_runtime = state.loop_wall_now()
    peak_gib, peak_kind = peak_memory(acc.device)
    eval_final, metric_after = log_evaluation(cfg, setup, folder, state, total_steps, "after")
    return summary_numbers(cfg, setup, state, train_runtime, eval_final, metric_after, peak_gib, peak_kind)


def summary_numbers(cfg: TrainConfig, setup: Setup, state: LoopState, train_runtime: float, eval_final: float,
                    metric_after: float | None, peak_gib: float, peak_kind: str) -> dict:
    """The summary's numbers of a completed loop (the original study's keys first)."""
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
                   setup.accelerator.device),
        "peak_memory_gib": round(peak_gib, 3),
        "peak_memory_kind": peak_kind,
        "eval_time_s": round(state.eval_time, 2),
        "eval_loss_first": state.eval_first,
        "eval_loss_final": eval_final,
        "task_metric_name": cfg.task_metric,
        "task_metric_before": state.metric_before,
        "task_metric_after": metric_after,
        "num_parameters": setup.derived["num_parameters"],
    }


def finish(cfg: TrainConfig, setup: Setup, folder: RunFolder, summary: dict) -> None:
    """Completes the run folder: the summary's numbers first (a save that fails keeps them), then the model
    (gathered from all processes when sharded), the figures, and the checkpoints pruned to
    keep_checkpoints_after_completion; `completed` is written then. The model card follows, from the
    completed folder's files, and the upload (push_to_hub), whose failure leaves the run completed."""
    from .card import write_card
    from .hub import push_run
    from .plotting import write_figures

    acc = setup.accelerator
    if folder.writable:
        folder.update_summary(**dict(summary, status="running"))
    if cfg.save_model:
        state = acc.get_state_dict(setup.loss_model)  # a collective under FSDP / ZeRO-3: every process calls it
        if folder.writable:
            state = {k.removeprefix("_orig_mod.").removeprefix("model."): v for k, v in state.items()}
            save_model(acc.unwrap_model(setup.loss_model).model, setup.tokenizer, state, folder.path / "model")
    acc.wait_for_everyone()
    if not folder.writable:
        return
    write_figures(folder.path, status="completed")
    checkpoint.prune(folder.path, cfg.keep_checkpoints_after_completion)
    folder.update_summary(status="completed")
    if cfg.save_model:
        print(f"model card: {write_card(folder.path)}", file=sys.stderr)
        if cfg.push_to_hub:
            pushed = push_run(folder.path, cfg.push_to_hub, cfg.push_private, cfg.push_revision)
            folder.update_summary(push_to_hub=pushed)
            print(f"uploaded to {pushed['url']}" if pushed["status"] == "uploaded" else
                  f"note: the run is complete, but uploading to {cfg.push_to_hub} failed: {pushed['reason']}; "
                  f"retry with: {pushed['retry']}", file=sys.stderr)
    print(f"done: {folder.path}  eval loss {summary['eval_loss_first']:.4f} -> {summary['eval_loss_final']:.4f}"
          + (f", {cfg.task_metric} {summary['task_metric_before']:.3f} -> {summary['task_metric_after']:.3f}"
             if cfg.task_metric and summary["task_metric_before"] is not None else ""), file=sys.stderr)


def save_model(model, tokenizer, state: dict, path: Path) -> None:
    """Writes the model and tokenizer under a temporary name and renames the folder when complete: `model/`
    is a whole model or absent, never a few files of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"saving the model to {path} ...", file=sys.stderr)
    began = time.perf_counter()
    try:
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
