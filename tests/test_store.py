"""The tokenized store: Arrow files written by `Dataset.map` in one or several processes, memory-mapped back,
with exactly the token ids and labels of `encode_chat`, conversation by conversation."""
from __future__ import annotations

import pytest

from sft import formats
from sft.config import TrainConfig
from sft.demo_data import demo_rows
from sft.packing import shift_labels
from sft.selection import Selection
from sft.store import TokenizedExamples, auto_num_proc, tokenize_to_store
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
    out = [formats.row_to_messages(row, fmt) for fmt, rows in ROWS.items() for row in rows]
    return out + [formats.row_to_messages(row, "messages") for row in demo_rows(None)]


def selection_of(conversations: list[list[dict]]) -> Selection:
    """Conversations in memory as one read source's table, every row selected, as `read_source` leaves them."""
    import json

    import numpy as np
    from datasets import Dataset

    texts = Dataset.from_dict({"conversation": [json.dumps(c, ensure_ascii=False) for c in conversations],
                               "tools": [None] * len(conversations),
                               "chars": [formats.content_chars(c) for c in conversations]})
    zeros = np.zeros(len(conversations), dtype=np.int64)
    return Selection([texts], zeros, np.arange(len(conversations)), zeros)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_the_store_holds_exactly_the_ids_and_labels_of_encode_chat(chatml_tokenizer, tmp_path, num_proc):
    convs = conversations()
    cfg = TrainConfig(experiment="x", max_length=4096, num_proc=num_proc)
    stats = tokenize_to_store(selection_of(convs), chatml_tokenizer, cfg, "test", ["x"], tmp_path / "s")
    store = TokenizedExamples(tmp_path / "s")
    assert stats["examples"] == len(store) == len(convs)
    for conversation, example in zip(convs, store):
        enc = encode_chat(chatml_tokenizer, conversation)
        assert example == shift_labels(enc.input_ids, enc.labels)
    assert store.lengths.tolist() == [len(e.input_ids) for e in store]
    assert stats["supervised_tokens"] == sum(sum(t != -100 for t in e.targets) for e in store)
    assert store.table.features["input_ids"].feature.dtype == "int32"  # compact columns
    assert store.table.features["supervised"].feature.dtype == "bool"


def test_truncation_and_drops_match_the_rules(chatml_tokenizer, tmp_path):
    convs = conversations()[:8]
    lengths = [len(encode_chat(chatml_tokenizer, c).input_ids) for c in convs]
    cap = sorted(lengths)[len(lengths) // 2]
    for too_long in ("truncate", "drop"):
        cfg = TrainConfig(experiment="x", max_length=cap, too_long=too_long, num_proc=1)
        stats = tokenize_to_store(selection_of(convs), chatml_tokenizer, cfg, "test", ["x"], tmp_path / too_long)
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


def write_source(path, rows: list[dict]) -> None:
    """The same rows as JSON lines, a JSON list, parquet or CSV."""
    import json

    import pandas as pd

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 2 else "") for i, r in enumerate(rows)))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)


ALPACA = [{"instruction": f"Double {i}.", "input": "" if i % 3 else "now", "output": str(2 * i) if i % 7 else " "}
          for i in range(40)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
@pytest.mark.parametrize("num_proc", [1, 2])
def test_reading_in_worker_processes_gives_the_rows_conversations_and_rejections_of_converting_each_row(
        tmp_path, suffix, num_proc):
    from collections import Counter

    from sft.data import read_source
    from sft.sources import Source

    path = tmp_path / f"d{suffix}"
    write_source(path, ALPACA)
    got = read_source(Source(str(path), None, "alpaca", None, None, "train", None, "d"), num_proc, tmp_path / "r")
    expected, rejected, numbers = [], Counter(), []
    for number, row in enumerate(ALPACA, 1):
        try:
            expected.append(formats.row_to_messages(row, "alpaca"))
            numbers.append(number)
        except formats.MalformedRow as e:
            rejected[e.reason] += 1
    assert got.read["rows_read"] == len(ALPACA) and got.read["rows_rejected"] == dict(rejected) != {}
    assert (got.usable + 1).tolist() == numbers
    rows = Selection.every_usable_row(got)
    assert [rows.conversation(i) for i in range(len(rows))] == expected
    assert rows.chars() == sum(len(m["content"]) for c in expected for m in c)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_the_first_bad_line_in_the_file_is_the_error_whichever_process_reads_it(tmp_path, num_proc):
    from sft.data import read_source
    from sft.errors import DataError
    from sft.sources import Source

    lines = [json_line(r) for r in ALPACA]
    lines[25] = '{"instruction": "x", "output": \n'  # in the second half: the second process reads it
    lines[31] = "[1, 2]\n"
    path = tmp_path / "d.jsonl"
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=rf"dataset file {path}, line 26: invalid JSON"):
        read_source(Source(str(path), None, "alpaca", None, None, "train", None, "d"), num_proc, tmp_path / "r")
    lines[10] = '"a string"\n'
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=rf"dataset file {path}, line 11: expected a JSON object \(one row\), got str"):
        read_source(Source(str(path), None, "alpaca", None, None, "train", None, "d"), num_proc, tmp_path / "r")


def json_line(row: dict) -> str:
    import json

    return json.dumps(row) + "\n"


def test_too_little_disk_is_one_clear_error_before_anything_is_read(tmp_path, monkeypatch, cache_dir, chatml_tokenizer):
    import shutil

    from sft.data import prepare_data
    from sft.errors import ConfigError

    path = tmp_path / "d.jsonl"
    write_source(path, ALPACA)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    cfg = TrainConfig(experiment="x", dataset=str(path), dataset_format="alpaca", eval_rows=4, num_proc=1)
    with pytest.raises(ConfigError, match=r"the tokenized store needs about 0\.00 GiB in .* and 0\.00 GiB are free; "
                                          r"free some space or point SFT_CACHE elsewhere"):
        prepare_data(cfg, chatml_tokenizer)
    assert not any((cache_dir / "tokenized").rglob("*.arrow"))  # nothing was read or written
