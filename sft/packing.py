"""Batching tokenized examples: packing into fixed-length rows, or padding to the longest in the batch.

Examples arrive with `input_ids` and `targets`, where `targets[t]` is the token the model must predict
after position t (already shifted inside the example, IGNORE_INDEX where no loss is taken, and at the
example's last position). Shifting before packing means no position ever predicts the first token of
the next packed example. Packed rows carry `position_ids` that restart at 0 for every example; the
model's attention path turns that into a block-diagonal causal mask (see `sft.attention`), so packed
examples never attend to each other.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from .templates import IGNORE_INDEX


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    targets: list[int]

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


def shift_labels(input_ids: list[int], labels: list[int]) -> Example:
    """targets[t] = labels[t + 1]: the loss at position t scores the prediction of the next token."""
    return Example(list(input_ids), list(labels[1:]) + [IGNORE_INDEX])


def pack_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Groups example indices into bins of at most `capacity` tokens, longest first, each into the
    fullest bin it still fits (best fit). Returns bins as lists of indices, in creation order."""
    if any(n > capacity for n in lengths):
        raise ValueError("an example is longer than the packing capacity")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin id), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
    return bins


def collate_packed(rows: list[list[Example]], row_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenates each row's examples and pads it to `row_length`; the padding is its own segment with
    IGNORE_INDEX targets, so it neither carries loss nor is attended to by the examples."""
    ids, tgts, pos = [], [], []
    for row in rows:
        r_ids, r_tgt, r_pos = [], [], []
        for ex in row:
            r_ids += ex.input_ids
            r_tgt += ex.targets
            r_pos += range(len(ex.input_ids))
        pad = row_length - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        tgts.append(r_tgt + [IGNORE_INDEX] * pad)
        pos.append(r_pos + list(range(pad)))
    n_real = sum(len(ex.input_ids) for row in rows for ex in row)
    return {"input_ids": torch.tensor(ids), "targets": torch.tensor(tgts), "position_ids": torch.tensor(pos),
            "num_real_tokens": n_real}


def collate_padded(examples: list[Example], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pads to the longest example in the batch, with an attention mask over the padding."""
    longest = max(len(ex.input_ids) for ex in examples)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids, tgts, mask = [], [], []
    for ex in examples:
        pad = longest - len(ex.input_ids)
        ids.append(ex.input_ids + [pad_id] * pad)
        tgts.append(ex.targets + [IGNORE_INDEX] * pad)
        mask.append([1] * len(ex.input_ids) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "targets": torch.tensor(tgts), "attention_mask": torch.tensor(mask),
            "num_real_tokens": sum(len(ex.input_ids) for ex in examples)}


LENGTH_GROUP_WINDOW = 512


def micro_batches(examples: list[Example], *, packing: bool, rows_per_batch: int, row_length: int, pad_id: int,
                  seed: int, pad_to_multiple_of: int = 1, group_by_length: bool = False,
                  padding_free: bool = False) -> list[dict]:
    """One epoch of collated micro-batches, in an order set by `seed` alone.

    Without packing, `group_by_length` sorts each window of LENGTH_GROUP_WINDOW shuffled examples by
    length before cutting micro-batches, then shuffles the micro-batches: padding shrinks to the
    length spread inside a batch while the order stays random at the batch level."""
    rng = random.Random(seed)
    if padding_free:  # one row per micro-batch: whole examples back to back, up to the token budget, no padding
        order = list(range(len(examples)))
        rng.shuffle(order)
        budget, rows, row, used = rows_per_batch * row_length, [], [], 0
        for i in order:
            n = len(examples[i].input_ids)
            if row and used + n > budget:
                rows.append(row)
                row, used = [], 0
            row.append(examples[i])
            used += n
        rows.append(row)
        return [collate_packed([r], sum(len(e.input_ids) for e in r), pad_id) for r in rows]
    if packing:
        bins = pack_best_fit_decreasing([len(e.input_ids) for e in examples], row_length)
        rng.shuffle(bins)
        rows = [[examples[i] for i in b] for b in bins]
        rows += [[]] * (-len(rows) % rows_per_batch)  # empty rows keep every micro-batch one shape (compile)
        return [collate_packed(rows[k:k + rows_per_batch], row_length, pad_id)
                for k in range(0, len(rows), rows_per_batch)]
    order = list(range(len(examples)))
    rng.shuffle(order)
    if group_by_length:
        order = [i for w in range(0, len(order), LENGTH_GROUP_WINDOW)
                 for i in sorted(order[w:w + LENGTH_GROUP_WINDOW], key=lambda i: len(examples[i].input_ids))]
    groups = [order[k:k + rows_per_batch] for k in range(0, len(order), rows_per_batch)]
    if group_by_length:
        rng.shuffle(groups)
    return [collate_padded([examples[i] for i in g], pad_id, pad_to_multiple_of) for g in groups]


def optimizer_steps(batches: list[dict], micro_batches_per_step: int) -> list[list[dict]]:
    """Groups micro-batches into optimizer steps; the last step may hold fewer (its loss is still
    normalized by its own supervised tokens, so it is an unbiased, smaller step)."""
    return [batches[k:k + micro_batches_per_step] for k in range(0, len(batches), micro_batches_per_step)]


def packing_efficiency(batches: list[dict]) -> float:
    slots = sum(b["input_ids"].numel() for b in batches)
    return sum(b["num_real_tokens"] for b in batches) / slots if slots else float("nan")
