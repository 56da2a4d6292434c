"""Batching tokenized examples: packing into fixed-length rows, or padding to the longest in the batch.

Examples arrive with `input_ids` and `targets`, where `targets[t]` is the token the model must predict
after position t (already shifted inside the example, IGNORE_INDEX where no loss is taken, and at the
example's last position). Shifting before packing means no position ever predicts the first token of
the next packed example. Packed rows carry `position_ids` that restart at 0 for every example; the
model's attention path turns that into a block-diagonal causal mask (see `sft.attention`), so packed
examples never attend to each other.
"""
from __future__ import annotations

import heapq
import math
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from queue import Full, Queue

import numpy as np
import torch

from .templates import IGNORE_INDEX


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    targets: list[int]


def shift_labels(input_ids: list[int], labels: list[int]) -> Example:
    """targets[t] = labels[t + 1]: the loss at position t scores the prediction of the next token."""
    return Example(list(input_ids), list(labels[1:]) + [IGNORE_INDEX])


def pack_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Groups example indices into bins of at most `capacity` tokens, longest first, each into the
    fullest bin it still fits (best fit; among equally full bins, the oldest). Returns bins as lists of
    indices, in creation order.

    Examples of one length are placed together: the bin that takes the first of them stays the fullest that
    fits the next while it has room for it, so it takes as many as fit at once. Finding a bin costs the
    same whatever the number of bins (see _BinsByFreeSpace), and a million examples take about a hundred
    thousand such lookups.

    >>> pack_best_fit_decreasing([3, 5, 2, 4], capacity=6)
    [[1], [3, 2], [0]]
    """
    by_length = np.asarray(lengths, dtype=np.int64)
    if len(by_length) and by_length.max() > capacity:
        raise ValueError("an example is longer than the packing capacity")
    order = np.argsort(-by_length, kind="stable")  # longest first; equal lengths in index order
    ordered = by_length[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(order) else np.array([], np.int64)
    ends = np.r_[starts[1:], len(order)]
    order = order.tolist()
    bins: list[list[int]] = []
    free = _BinsByFreeSpace()
    for i, end, n in zip(starts.tolist(), ends.tolist(), ordered[starts].tolist()):
        while i < end:
            found = free.pop_fullest_fitting(n)
            if found is None:
                bins.append([])
                found = capacity, len(bins) - 1
            space, b = found
            take = end - i if n == 0 else min(end - i, space // n)
            bins[b] += order[i:i + take]
            i += take
            free.add(space - take * n, b)
    return bins


class _BinsByFreeSpace:
    """Open bins keyed by their free space (0..capacity): one bit per free-space value that some bin has,
    in a Python integer, finds the least free space that is at least n with a shift and a lowest-bit test
    (machine-word operations, whatever the number of bins); a heap per value keeps the oldest bin first."""

    def __init__(self):
        self.present = 0  # bit s is set when some open bin has exactly s free
        self.bins: dict[int, list[int]] = {}

    def add(self, space: int, b: int) -> None:
        heapq.heappush(self.bins.setdefault(space, []), b)
        self.present |= 1 << space

    def pop_fullest_fitting(self, n: int) -> tuple[int, int] | None:
        """(free space, bin) of the fullest bin with at least `n` free, removed from the open bins; None if none."""
        above = self.present >> n
        if not above:
            return None
        space = n + (above & -above).bit_length() - 1
        same = self.bins[space]
        b = heapq.heappop(same)
        if not same:
            self.present &= ~(1 << space)
        return space, b


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


@dataclass(frozen=True)
class MicroBatch:
    """A micro-batch as a plan: which examples go into which row. It is small (indices only) and is collated
    into tensors only when training reaches it, so an epoch's batches never all exist at once.
    `packed`: rows of `length` token slots (padding-free rows are packed rows as long as their examples);
    otherwise one example per row, padded to the longest, rounded up to a multiple of `length`."""
    rows: tuple[tuple[int, ...], ...]
    packed: bool
    length: int

    def collate(self, examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
        if self.packed:
            return collate_packed([[examples[i] for i in row] for row in self.rows], self.length, pad_id)
        return collate_padded([examples[row[0]] for row in self.rows], pad_id, self.length)

    def token_counts(self, lengths: list[int]) -> tuple[int, int]:
        """(real tokens, token slots) of the collated batch, from the examples' lengths alone."""
        real = sum(lengths[i] for row in self.rows for i in row)
        if self.packed:
            return real, len(self.rows) * self.length
        longest = max(lengths[row[0]] for row in self.rows)
        return real, len(self.rows) * -(-longest // self.length) * self.length


def plan_epoch(lengths: list[int], *, packing: bool, rows_per_batch: int, row_length: int, seed: int,
               pad_to_multiple_of: int = 1, group_by_length: bool = False,
               padding_free: bool = False) -> list[MicroBatch]:
    """One epoch of micro-batches, as plans over the examples with these `lengths`, in an order set by
    `seed` alone.

    Without packing, `group_by_length` sorts each window of LENGTH_GROUP_WINDOW shuffled examples by
    length before cutting micro-batches, then shuffles the micro-batches: padding shrinks to the
    length spread inside a batch while the order stays random at the batch level."""
    rng = random.Random(seed)
    if padding_free:  # one row per micro-batch: whole examples back to back, up to the token budget, no padding
        order = list(range(len(lengths)))
        rng.shuffle(order)
        budget, rows, row, used = rows_per_batch * row_length, [], [], 0
        for i in order:
            if row and used + lengths[i] > budget:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += lengths[i]
        rows.append(row)
        return [MicroBatch((tuple(r),), True, sum(lengths[i] for i in r)) for r in rows]
    if packing:
        bins = pack_best_fit_decreasing(lengths, row_length)
        rng.shuffle(bins)
        rows = [tuple(b) for b in bins]
        rows += [()] * (-len(rows) % rows_per_batch)  # empty rows keep every micro-batch one shape (compile)
        return [MicroBatch(tuple(rows[k:k + rows_per_batch]), True, row_length)
                for k in range(0, len(rows), rows_per_batch)]
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        order = [i for w in range(0, len(order), LENGTH_GROUP_WINDOW)
                 for i in sorted(order[w:w + LENGTH_GROUP_WINDOW], key=lambda i: lengths[i])]
    groups = [order[k:k + rows_per_batch] for k in range(0, len(order), rows_per_batch)]
    if group_by_length:
        rng.shuffle(groups)
    return [MicroBatch(tuple((i,) for i in g), False, pad_to_multiple_of) for g in groups]


def optimizer_steps(batches: list, micro_batches_per_step: int) -> list[list]:
    """Groups micro-batches into optimizer steps; the last step may hold fewer (its loss is still
    normalized by its own supervised tokens, so it is an unbiased, smaller step)."""
    return [batches[k:k + micro_batches_per_step] for k in range(0, len(batches), micro_batches_per_step)]


def plan_steps(lengths: list[int], *, epochs: int, micro_batches_per_step: int, seed: int, max_steps: int | None,
               **epoch_settings) -> tuple[list[list[MicroBatch]], int]:
    """The run's optimizer steps as plans (each epoch's micro-batches from `plan_epoch` with the seed
    `seed * 1000 + epoch`, grouped into steps), cut to `max_steps`, and the steps in an epoch."""
    steps: list[list[MicroBatch]] = []
    for epoch in range(epochs):
        steps += optimizer_steps(plan_epoch(lengths, seed=seed * 1000 + epoch, **epoch_settings),
                                 micro_batches_per_step)
    steps_per_epoch = math.ceil(len(steps) / epochs)
    return (steps[:max_steps] if max_steps is not None else steps), steps_per_epoch


def packing_efficiency(batches: list[MicroBatch], lengths: list[int]) -> float:
    """Real tokens over token slots, over the planned micro-batches."""
    real, slots = map(sum, zip(*(mb.token_counts(lengths) for mb in batches))) if batches else (0, 0)
    return real / slots if slots else float("nan")


def collated_steps(steps: list[list[MicroBatch]], examples: list[Example], pad_id: int, *,
                   pin_memory: bool = False, ahead: int = 2) -> Iterator[list[dict]]:
    """The optimizer steps' micro-batches as tensors, collated by a background thread up to `ahead` steps
    before they are used (pinned, on GPUs, so that their copy to the device does not wait for the host):
    the device never waits for collation, and only a few steps' tensors exist at any time."""
    queue: Queue = Queue(maxsize=ahead)
    stop = threading.Event()

    def put(item) -> bool:
        """Hands `item` over unless the consumer has gone; False once it has."""
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def work() -> None:
        try:
            for step in steps:
                batches = [mb.collate(examples, pad_id) for mb in step]
                if pin_memory:
                    batches = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                               for b in batches]
                if not put(batches):
                    return
            put(None)
        except BaseException as e:  # raised again in the training thread
            put(e)

    worker = threading.Thread(target=work, name="collate", daemon=True)
    worker.start()
    try:
        while (item := queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
