"""Held-out evaluation: the held-out loss (`held_out_batches`, `held_out_losses`) and the generation pass
(samples and the task metric), shared by the training loop and `python -m sft.evaluate`.

Also the two pieces every pass over batches shares with the training step: a process's share of the
batches (`my_share`) and a micro-batch moved to the device (`batch_to_device`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .config import TrainConfig
from .data import PreparedData
from .generation import Decoding, generate_replies, task_metric
from .loss import host_indices
from .packing import collate_padded
from .run_folder import RunFolder, sample_record
from .templates import IGNORE_INDEX, prompt_and_reference, render

if TYPE_CHECKING:
    from .setup import Setup


def my_share(n: int, acc) -> list[tuple[int, bool]]:
    """This process's share of n items, as (index, counts). Every process gets the same number of items,
    padding with repeats that do not count: wrapped models run collectives in each forward pass (DDP
    buffer broadcasts, FSDP all-gathers), so every process must run as many forward passes."""
    per_process = -(-n // acc.num_processes)
    mine = list(range(acc.process_index, n, acc.num_processes))
    return [(i, True) for i in mine] + [(0, False)] * (per_process - len(mine)) if n else []


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """The micro-batch's tensors on the device, with the loss's index tensors made on the host first."""
    batch = dict(batch, **host_indices(batch))
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def supervised_tokens(batch: dict) -> int:
    """The tokens of a collated batch that the loss supervises: its denominator."""
    return int((batch["targets"] != IGNORE_INDEX).sum())


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
                total[source, 1] += supervised_tokens(batch)
    loss_model.train(was_training)
    if acc.num_processes > 1:
        total = acc.reduce(total, reduction="sum")
    total = total.tolist()

    def mean(loss: float, targets: float) -> float:
        return loss / targets if targets > 0 else float("nan")

    overall = mean(sum(t[0] for t in total), sum(t[1] for t in total))
    return overall, ({name: mean(*t) for name, t in zip(names, total)} if len(names) > 1 else None)


def sample_records(tokenizer, prompts, tools: list, replies: list, references, count: int,
                   stage: str | None = None, decoding: Decoding | None = None) -> list[dict]:
    """The first `count` prompts' samples, as the run folder records them (run_folder.sample_record)."""
    return [sample_record(i, prompts[i], tools[i], render(tokenizer, list(prompts[i]), True, tools[i]), replies[i],
                          references[i], stage, decoding.record() if decoding is not None else None)
            for i in range(count)]


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
    decoding = Decoding.from_config(cfg)
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
        folder.append_samples(stage, step, sample_records(setup.tokenizer, prompts, tools, replies, references,
                                                          min(cfg.num_samples, len(prompts)), stage, decoding))
    if not cfg.task_metric:
        return None
    k = min(cfg.task_metric_rows, len(prompts))
    return task_metric(cfg.task_metric, replies[:k], list(references[:k]))
