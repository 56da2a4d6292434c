"""Packing and padding: bin assignment, collation, batch order, and that packing does not change the loss."""
from __future__ import annotations

import random

import pytest
import torch

from sft.demo_data import demo_rows
from sft.loss import LossModel
from sft.modeling import load_model
from sft.packing import (Example, collate_packed, collate_padded, pack_best_fit_decreasing, plan_epoch,
                         shift_labels)
from sft.templates import IGNORE_INDEX, encode_chat

X = IGNORE_INDEX


def micro_batches(examples: list[Example], *, pad_id: int, **plan) -> list[dict]:
    """One epoch of collated micro-batches at once (plan_epoch's arguments); training collates step by step."""
    return [mb.collate(examples, pad_id) for mb in plan_epoch([len(e.input_ids) for e in examples], **plan)]


def num_supervised(example: Example) -> int:
    return sum(t != IGNORE_INDEX for t in example.targets)


def test_best_fit_decreasing_bins_on_hand_made_lengths():
    assert pack_best_fit_decreasing([5, 3, 7, 2, 4, 1], 8) == [[2, 5], [0, 1], [4, 3]]


def test_best_fit_puts_an_example_into_the_fullest_bin_it_fits_not_the_first():
    # 8 -> bin 0 (2 free), 6 -> bin 1, 3 -> bin 1 (1 free), 3 -> bin 2; the 1 goes to bin 1 (first fit: bin 0).
    assert pack_best_fit_decreasing([1, 8, 6, 3, 3], 10) == [[1], [2, 3, 0], [4]]


def test_example_filling_the_capacity_exactly_gets_its_own_bin():
    assert pack_best_fit_decreasing([4, 8, 4], 8) == [[1], [0, 2]]


def test_example_longer_than_capacity_is_refused():
    with pytest.raises(ValueError, match="longer than the packing capacity"):
        pack_best_fit_decreasing([3, 9], 8)


def test_bins_never_exceed_capacity_and_hold_every_index_once():
    rng = random.Random(1234)
    for _ in range(200):
        capacity = rng.randint(1, 64)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 40))]
        bins = pack_best_fit_decreasing(lengths, capacity)
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(b for b in bins)
        # best fit never leaves two bins that could be merged into one
        loads = sorted(sum(lengths[i] for i in b) for b in bins)
        assert len(loads) < 2 or loads[0] + loads[1] > capacity


def test_shift_labels_targets_the_next_token():
    ex = shift_labels([10, 11, 12, 13], [X, X, 12, 13])
    assert ex == Example([10, 11, 12, 13], [X, 12, 13, X])
    assert num_supervised(ex) == 2


def test_collate_packed_restarts_positions_per_example_and_pads_with_ignored_targets():
    a = shift_labels([1, 2, 3], [X, 2, 3])
    b = shift_labels([4, 5], [4, 5])
    c = shift_labels([6, 7, 8, 9], [X, X, 8, 9])
    batch = collate_packed([[a, b], [c]], row_length=6, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert batch["targets"].tolist() == [[2, 3, X, 5, X, X], [X, 8, 9, X, X, X]]
    assert batch["num_real_tokens"] == 9


def test_no_packed_target_crosses_an_example_boundary():
    rng = random.Random(0)
    examples = []
    for _ in range(30):
        ids = [rng.randint(3, 99) for _ in range(rng.randint(1, 12))]
        examples.append(shift_labels(ids, ids))  # every token supervised: the worst case for leaks
    batches = micro_batches(examples, packing=True, rows_per_batch=3, row_length=16, pad_id=0, seed=0)
    for batch in batches:
        for ids, tgts, pos in zip(batch["input_ids"].tolist(), batch["targets"].tolist(),
                                  batch["position_ids"].tolist()):
            for t in range(len(ids)):
                last_of_segment = t + 1 == len(ids) or pos[t + 1] == 0
                if last_of_segment or ids[t] == 0:  # 0 is padding here
                    assert tgts[t] == X
                else:
                    assert tgts[t] == ids[t + 1]
    assert sum(b["num_real_tokens"] for b in batches) == sum(len(e.input_ids) for e in examples)


def test_collate_padded_masks_the_padding():
    a = shift_labels([1, 2, 3], [X, 2, 3])
    b = shift_labels([4], [4])
    batch = collate_padded([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["targets"].tolist() == [[2, 3, X], [X, X, X]]
    batch = collate_padded([a, b], pad_id=0, pad_to_multiple_of=4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("packing,group_by_length", [(True, False), (False, False), (False, True)],
                         ids=["packed", "padded", "padded_grouped"])
def test_micro_batch_order_is_set_by_the_seed(packing, group_by_length):
    rng = random.Random(0)
    examples = [shift_labels(ids, ids) for ids in ([rng.randint(3, 99)] * rng.randint(1, 10) for _ in range(40))]

    def order(seed):
        batches = micro_batches(examples, packing=packing, rows_per_batch=2, row_length=12, pad_id=0, seed=seed,
                                group_by_length=group_by_length)
        return [b["input_ids"].tolist() for b in batches]

    def tokens(batches):
        return sorted(t for b in batches for row in b for t in row if t)

    assert order(7) == order(7)
    assert order(7) != order(8)
    assert tokens(order(7)) == tokens(order(8))  # the same examples, only in another order


# --- packing must not change the loss ----------------------------------------------------------------

GRAD_PARAMS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.1.mlp.down_proj.weight")


@pytest.fixture(scope="module")
def demo_examples(chatml_tokenizer):
    out = []
    for row in demo_rows(6):
        enc = encode_chat(chatml_tokenizer, row["messages"])
        out.append(shift_labels(enc.input_ids, enc.labels))
    return out


def loss_model(model_dir, attn: str, impl: str) -> LossModel:
    model = load_model(str(model_dir), attn_implementation=attn)
    # At the default init (std 0.02) attention barely moves the residual stream, so even examples that
    # attend to each other would change the loss only slightly; larger weights make the loss depend on context.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(5)
    return LossModel(model, impl, chunk_tokens=8)


def loss_and_grads(lm: LossModel, batches: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    lm.zero_grad()
    total = sum(lm(**{k: v for k, v in b.items() if k != "num_real_tokens"}) for b in batches)
    total.backward()
    params = dict(lm.model.named_parameters())
    return total.detach(), {n: params[n].grad.clone() for n in GRAD_PARAMS}


def reference(lm: LossModel, examples: list[Example]):
    """Each example alone, unpadded and unpacked: the loss packing must reproduce."""
    return loss_and_grads(lm, [{"input_ids": torch.tensor([e.input_ids]), "targets": torch.tensor([e.targets])}
                               for e in examples])


def assert_same_loss_and_grads(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    for name in GRAD_PARAMS:
        g, w = got[1][name], want[1][name]
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item(), msg=name)


@pytest.mark.parametrize("impl", ["full", "selected"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_loss_and_grads_equal_unpacked(tiny_model_dir, chatml_tokenizer, demo_examples, attn, impl):
    lm = loss_model(tiny_model_dir, attn, impl)
    want = reference(lm, demo_examples)
    pad = chatml_tokenizer.pad_token_id
    packed = micro_batches(demo_examples, packing=True, rows_per_batch=2, row_length=96, pad_id=pad, seed=0)
    assert any(row.eq(0).sum() > 2 for batch in packed for row in batch["position_ids"])  # rows hold >1 example
    assert_same_loss_and_grads(loss_and_grads(lm, packed), want)
    padded = micro_batches(demo_examples, packing=False, rows_per_batch=4, row_length=96, pad_id=pad, seed=0)
    assert any(batch["attention_mask"].eq(0).any() for batch in padded)
    assert_same_loss_and_grads(loss_and_grads(lm, padded), want)


def test_packing_without_restarting_positions_changes_the_loss(tiny_model_dir, chatml_tokenizer, demo_examples):
    lm = loss_model(tiny_model_dir, "sdpa", "full")
    want = reference(lm, demo_examples)
    packed = micro_batches(demo_examples, packing=True, rows_per_batch=2, row_length=96,
                           pad_id=chatml_tokenizer.pad_token_id, seed=0)
    for batch in packed:  # one sequence per row: the examples in it attend to each other
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    got = loss_and_grads(lm, packed)
    assert abs(got[0] - want[0]) > 1e-4 * want[0]
    with pytest.raises(AssertionError):
        assert_same_loss_and_grads(got, want)


def test_packed_micro_batches_all_have_one_shape():
    """A compiled model sees one input shape: the last micro-batch is filled with empty rows that carry
    no targets and no real tokens."""
    examples = [shift_labels(list(range(1, n + 1)), list(range(1, n + 1))) for n in (5, 9, 3, 7, 2, 8, 6)]
    batches = micro_batches(examples, packing=True, rows_per_batch=3, row_length=10, pad_id=0, seed=1)
    assert {tuple(b["input_ids"].shape) for b in batches} == {(3, 10)}
    assert sum(b["num_real_tokens"] for b in batches) == sum(len(e.input_ids) for e in examples)
    assert sum(int((b["targets"] != -100).sum()) for b in batches) == sum(num_supervised(e) for e in examples)


def _best_fit_by_scanning(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best fit decreasing the plain way (a sorted list of (free space, bin), scanned per example): the
    reference that the constant-time bin lookup must reproduce exactly."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, free = [], []
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - lengths[i], b))
    return bins


def test_best_fit_gives_the_same_bins_as_the_plain_scan_on_random_lengths():
    rng = random.Random(0)
    for _ in range(300):
        capacity = rng.choice([1, 2, 7, 16, 100, 513, 4096])
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 400))]
        assert pack_best_fit_decreasing(lengths, capacity) == _best_fit_by_scanning(lengths, capacity)
        # few distinct lengths: long runs of equal examples, which one bin takes several of at once
        few = [rng.randint(1, capacity) for _ in range(rng.randint(1, 4))]
        lengths = [rng.choice(few) for _ in range(rng.randint(0, 400))]
        assert pack_best_fit_decreasing(lengths, capacity) == _best_fit_by_scanning(lengths, capacity)


def _random_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(1, 12)
        out.append(Example([rng.randint(1, 50) for _ in range(length)],
                           [rng.choice([IGNORE_INDEX, rng.randint(1, 50)]) for _ in range(length)]))
    return out


@pytest.mark.parametrize("layout", [dict(packing=True), dict(packing=False, group_by_length=True),
                                    dict(packing=False, padding_free=True)])
def test_steps_collated_in_the_background_equal_the_whole_epoch_collated_at_once(layout):
    from sft.packing import collated_steps, optimizer_steps, plan_epoch

    examples = _random_examples(50, seed=3)
    settings = dict(rows_per_batch=2, row_length=16, seed=7, **layout)
    plans = plan_epoch([len(e.input_ids) for e in examples], **settings)
    assert all(isinstance(i, int) for mb in plans for row in mb.rows for i in row)  # indices only, no tensors
    eager = optimizer_steps(micro_batches(examples, pad_id=0, **settings), 3)
    lazy = list(collated_steps(optimizer_steps(plans, 3), examples, pad_id=0, ahead=1))
    assert len(lazy) == len(eager)
    for got, want in zip(lazy, eager):
        for a, b in zip(got, want, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                                for k in a)


def test_the_collating_thread_stops_when_training_stops_and_passes_its_errors_on():
    import threading

    from sft.packing import MicroBatch, collated_steps

    examples = _random_examples(20, seed=1)
    steps = [[MicroBatch(((i,),), False, 1)] for i in range(20)]
    for first in collated_steps(steps, examples, pad_id=0, ahead=1):
        break  # training stopped after one step (an interruption, a time cap)
    assert torch.equal(first[0]["input_ids"][0], torch.tensor(examples[0].input_ids))
    assert not [t for t in threading.enumerate() if t.name == "collate"]  # nothing left collating
    broken = steps[:2] + [[MicroBatch(((99,),), False, 1)]]  # an index past the examples
    with pytest.raises(IndexError):
        list(collated_steps(broken, examples, pad_id=0))
