"""The tokenized store: Arrow files written by `Dataset.map` in one or several processes, memory-mapped back,
with exactly the token ids and labels of `encode_chat`, conversation by conversation."""
from __future__ import annotations

import pytest

from sft import formats
from sft.config import TrainConfig
from sft.data import TokenizedExamples, auto_num_proc, tokenize_to_store
from sft.demo_data import demo_rows
from sft.packing import shift_labels
from sft.templates import encode_chat

ROWS = {  # one or two rows of every format, as a source holds them
    "messages": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"}]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "Blue."}]}],
    "prompt_completion": [{"prompt": "Capital of France?", "completion": "Paris."}],
    "dolphin": [{"instruction": "You are terse.", "input": "Say yes.", "output": "Yes."},
                {"instruction": "", "input": "Count to 3.", "output": "1 2 3"}],
    "alpaca": [{"instruction": "Translate to French.", "input": "cat", "output": "chat"},
               {"instruction": "Give a prime.", "input": "", "output": "7"}],
    "guanaco": [{"text": "### Human: Why is the sky blue?### Assistant: Rayleigh scattering.### Human: Short?"
                         "### Assistant: Yes."}],
}


def conversations() -> list[list[dict]]:
    out = []
    for fmt, rows in ROWS.items():
        converted, rejected, _ = formats.convert_rows(rows, fmt)
        assert len(converted) == len(rows), (fmt, rejected)
        out += converted
    demo, _, _ = formats.convert_rows(demo_rows(None), "messages")
    return out + demo


def numbered(convs: list[list[dict]]) -> list[tuple[int, int, list[dict]]]:
    return [(0, n, c) for n, c in enumerate(convs, 1)]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_the_store_holds_exactly_the_ids_and_labels_of_encode_chat(chatml_tokenizer, tmp_path, num_proc):
    convs = conversations()
    cfg = TrainConfig(experiment="x", max_length=4096, num_proc=num_proc)
    stats = tokenize_to_store(numbered(convs), chatml_tokenizer, cfg, "test", ["x"], tmp_path / "s")
    store = TokenizedExamples(tmp_path / "s")
    assert stats["examples"] == len(store) == len(convs)
    for conversation, example in zip(convs, store):
        enc = encode_chat(chatml_tokenizer, conversation)
        assert example == shift_labels(enc.input_ids, enc.labels)
    assert store.lengths.tolist() == [len(e.input_ids) for e in store]
    assert stats["supervised_tokens"] == sum(e.num_targets for e in store)
    assert store.table.features["input_ids"].feature.dtype == "int32"  # compact columns
    assert store.table.features["supervised"].feature.dtype == "bool"


def test_truncation_and_drops_match_the_rules(chatml_tokenizer, tmp_path):
    convs = conversations()[:8]
    lengths = [len(encode_chat(chatml_tokenizer, c).input_ids) for c in convs]
    cap = sorted(lengths)[len(lengths) // 2]
    for too_long in ("truncate", "drop"):
        cfg = TrainConfig(experiment="x", max_length=cap, too_long=too_long, num_proc=1)
        stats = tokenize_to_store(numbered(convs), chatml_tokenizer, cfg, "test", ["x"], tmp_path / too_long)
        store = TokenizedExamples(tmp_path / too_long)
        assert all(len(e.input_ids) <= cap for e in store)
        over = sum(n > cap for n in lengths)
        if too_long == "drop":
            assert stats["dropped"] == {"too_long": over} and len(store) == len(convs) - over
        else:
            assert stats["truncated"] + sum(stats["dropped"].values()) == over


def test_auto_uses_the_available_cores_for_large_sets_only(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert auto_num_proc("auto", 100) == 1  # starting processes would cost more than it saves
    assert auto_num_proc("auto", 1_000_000) == 32  # capped
    assert auto_num_proc(3, 100) == 3  # an explicit count is kept
