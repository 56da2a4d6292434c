"""The training loop: one optimizer step (`train_step`), what the loop accumulates (`LoopState`, `Window`),
the stop on a signal (`StopRequest`, `Interrupted`), and `train_loop` itself, with its held-out evaluations
(`log_evaluation`) and checkpoints (`save_checkpoint`).
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .config import TrainConfig
from .errors import SFTError
from .evaluation import batch_to_device, evaluate_loss, generation_pass, my_share, supervised_tokens
from .perf import peak_memory, reset_peak_memory, synchronize
from .run_folder import RunFolder, eval_record, train_record
from .setup import Setup
from .tracking import Trackers


class TrainingError(SFTError):
    """Training cannot go on (for example, the loss is no longer finite)."""


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
    total_supervised = sum(supervised_tokens(b) for b in step_batches)
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


def step_plan(setup: Setup) -> list:
    """What a checkpoint's data position means: the number of steps and the tokenized data's key."""
    return [len(setup.steps), setup.data.stats.get("tokenization_cache", {}).get("key")]


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
        """From trainer_state.json."""
        return cls(**{**record, "window": Window(**record["window"])})


class LoopEnd(NamedTuple):
    """What a completed loop hands on to the summary."""
    state: LoopState
    train_runtime: float  # wall seconds of the loop, over resumes
    eval_final: float
    metric_after: float | None
    peak_gib: float
    peak_kind: str


def log_evaluation(cfg: TrainConfig, setup: Setup, folder: RunFolder, state: LoopState, step: int, stage: str | None,
                   ) -> tuple[float, float | None]:
    """The held-out loss (and, at a `stage` "before" or "after", the generation pass with its task metric),
    logged to metrics.jsonl and the console; its time counts as evaluation time."""
    t = time.perf_counter()
    eval_loss, by_source = evaluate_loss(setup)
    metric = generation_pass(cfg, setup, stage, folder, step) if stage is not None else None
    state.eval_time += time.perf_counter() - t
    folder.append_metrics(eval_record(step, round(step / setup.steps_per_epoch, 4), state.tokens, eval_loss,
                                      by_source, metric, cfg.task_metric, state.elapsed_now()))
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


def start_loop(cfg: TrainConfig, setup: Setup, folder: RunFolder, restored: LoopState | None) -> LoopState:
    """The loop's state at its first step: the trackers opened, and either the restored checkpoint's state
    (the records past it dropped) or the evaluation before training."""
    state = restored or LoopState(plan=step_plan(setup))
    if folder.writable and cfg.report_to:
        folder.trackers = Trackers(cfg.report_to, folder.path, folder.path.name, cfg.to_dict(),
                                   resume_step=restored.step if restored is not None else None)
    if restored is not None:
        folder.truncate_metrics(state.step)
        folder.drop_samples("after")  # a crash during the final generation pass may have left some
        print(f"resumed at step {state.step} of {len(setup.steps)}", file=sys.stderr)
    else:
        state.eval_first, state.metric_before = log_evaluation(cfg, setup, folder, state, 0, "before")
    return state


def log_train(setup: Setup, folder: RunFolder, state: LoopState, done: StepResult, lr: float, bar) -> None:
    """The train line of the step just done, over the window since the line before, which starts anew."""
    window, step = state.window, state.step
    tps, mean_loss = window.tokens / window.seconds, window.loss_sum / window.supervised
    folder.append_metrics(train_record(step, round(step / setup.steps_per_epoch, 4), mean_loss, lr, done.grad_norm,
                                       state.tokens, state.supervised, tps, state.elapsed_now()))
    bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
    state.window = Window()


def timed_step(setup: Setup, step_batches: list[dict], step: Callable, number: int,
               checkpointing: bool) -> tuple[StepResult, float]:
    """One optimizer step and its seconds (the device synchronized); a loss that is not finite stops the run."""
    t = time.perf_counter()
    done = step(setup, step_batches)
    synchronize(setup.accelerator.device)
    seconds = time.perf_counter() - t
    if not math.isfinite(done.loss):
        raise TrainingError(f"the training loss became {done.loss} at step {number}; lower lr or check the data"
                            + ("; the last good checkpoint is kept" if checkpointing else ""))
    return done, seconds


def train_loop(cfg: TrainConfig, setup: Setup, folder: RunFolder, restored: LoopState | None = None,
               step: Callable[[Setup, list[dict]], StepResult] = train_step) -> LoopEnd:
    """The optimizer steps of the run (from a checkpoint's state when `restored`), with the held-out
    evaluations before, every eval_every steps and after, logging, checkpoints and the stop on a signal.
    `step` runs one optimizer step (train_step; tests wrap it to inject failures)."""
    acc = setup.accelerator
    total_steps = len(setup.steps)
    state = start_loop(cfg, setup, folder, restored)
    # from_pretrained returns a model in eval mode, where transformers skips activation checkpointing and
    # dropout; a resumed run has no step-0 evaluation that would happen to leave it in training mode.
    setup.loss_model.train()
    reset_peak_memory(acc.device)
    state.loop_began = time.perf_counter()
    bar = tqdm(total=total_steps, initial=state.step, desc=cfg.experiment, disable=not acc.is_local_main_process,
               dynamic_ncols=True)
    with StopRequest(announce=acc.is_main_process) as stop, bar:  # the bar closes before any error is printed
        for step_batches in setup.batches(state.step):
            number = state.step + 1
            lr = setup.scheduler.get_last_lr()[0]
            done, seconds = timed_step(setup, step_batches, step, number, bool(cfg.checkpoint_every))
            state.add(done, seconds)
            if number % cfg.log_every == 0 or number == total_steps:
                log_train(setup, folder, state, done, lr, bar)
            bar.update(1)
            if cfg.eval_every and number % cfg.eval_every == 0 and number != total_steps:
                log_evaluation(cfg, setup, folder, state, number, None)
            if stop.requested(acc):
                path = save_checkpoint(cfg, setup, folder, state)
                raise Interrupted(stop.signal or "a signal on another process", folder.path, path,
                                  f"stopped after step {number}")
            if cfg.checkpoint_every and number % cfg.checkpoint_every == 0 and number != total_steps:
                save_checkpoint(cfg, setup, folder, state)
    return end_loop(cfg, setup, folder, state)


def end_loop(cfg: TrainConfig, setup: Setup, folder: RunFolder, state: LoopState) -> LoopEnd:
    """After the last step: the final step's checkpoint when completed runs keep one, the loop's time and peak
    memory (read before the evaluation after training adds to them), then that evaluation."""
    total_steps = len(setup.steps)
    if cfg.keep_checkpoints_after_completion and state.step == total_steps and not any(
            p.name == f"{checkpoint.PREFIX}{total_steps:06d}" for p in checkpoint.checkpoints(folder.path)):
        save_checkpoint(cfg, setup, folder, state)  # the final step's: training can be extended from it
    train_runtime = state.loop_wall_now()
    peak_gib, peak_kind = peak_memory(setup.accelerator.device)
    eval_final, metric_after = log_evaluation(cfg, setup, folder, state, total_steps, "after")
    return LoopEnd(state, train_runtime, eval_final, metric_after, peak_gib, peak_kind)
