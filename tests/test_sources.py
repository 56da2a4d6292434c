import json
import re

import datasets
import pandas as pd
import pytest

from sft.errors import ConfigError, DataError
from sft.selection import shuffle_rows, split_heldout
from sft.sources import hub_dataset, local_path, parse_row, row_texts
from conftest import write_jsonl

ROWS = [
    {"instruction": "Say hi.", "input": "", "output": "Hi"},
    {"instruction": "Add.", "input": "2+2", "output": "4"},
    {"instruction": "Quote.", "input": 'He said "no",\nthen left.', "output": "ok"},
]


def read_rows(source, max_rows=None) -> list[dict]:
    """The rows of a local source, each parsed as it is read."""
    return [parse_row(*text) for text in row_texts(source, max_rows=max_rows)]


# local files


def test_jsonl_round_trip(tmp_path):
    assert read_rows(write_jsonl(tmp_path / "d.jsonl", ROWS)) == ROWS


def test_json_list_round_trip(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert read_rows(str(path)) == ROWS


def test_json_file_holding_json_lines_with_blank_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("\n" + "\n\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    assert read_rows(path) == ROWS


def test_json_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8-sig")
    assert read_rows(path) == ROWS


def test_parquet_round_trip_keeps_nested_messages(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 3
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    assert read_rows(tmp_path / "d.parquet") == rows


def test_csv_round_trip_keeps_empty_cells_as_empty_strings(tmp_path):
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    assert read_rows(tmp_path / "d.csv") == ROWS


def test_directory_reads_its_files_in_name_order_and_skips_hidden_ones(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    (tmp_path / ".cache").mkdir()
    write_jsonl(tmp_path / ".cache" / "c.jsonl", [{"junk": "x"}])
    (tmp_path / "README.md").write_text("not data")
    assert read_rows(tmp_path) == ROWS


def test_max_rows_takes_the_first_rows_across_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    assert read_rows(tmp_path, max_rows=2) == ROWS[:2]
    assert read_rows(tmp_path / "b.jsonl", max_rows=1) == ROWS[1:2]
    assert read_rows(tmp_path / "b.jsonl", max_rows=100) == ROWS[1:]


def test_max_rows_does_not_read_past_the_rows_it_needs(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{broken\n", encoding="utf-8")
    assert read_rows(path, max_rows=1) == ROWS[:1]


@pytest.mark.parametrize("max_rows", [0, -1, 1.5, True])
def test_max_rows_must_be_a_positive_int(tmp_path, max_rows):
    with pytest.raises(ConfigError, match="max_rows must be a positive integer"):
        read_rows(write_jsonl(tmp_path / "d.jsonl", ROWS), max_rows=max_rows)


@pytest.mark.parametrize(
    "source", ["missing.jsonl", "./data/train", "/no/such/dir", "~/no_such_sft_dir/x", "a/b.csv"]
)
def test_missing_path_names_the_path_and_never_falls_through_to_the_hub(monkeypatch, source):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub was called"))
    with pytest.raises(DataError) as info:
        local_path(source)
    assert str(info.value) == f"dataset path {source} does not exist"


def test_source_that_is_neither_path_nor_hub_id():
    with pytest.raises(DataError, match="'alpaca' is neither an existing local path nor a hub dataset id"):
        local_path("alpaca")


@pytest.mark.parametrize(
    "name, content", [("e.jsonl", ""), ("e.json", "[]"), ("e.csv", ""), ("h.csv", "a,b\n")]
)
def test_empty_file_is_an_error(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=f"dataset {tmp_path / name} has no rows"):
        read_rows(tmp_path / name)


@pytest.mark.parametrize("body", ["What is 2+2?,4,math\nhi,there,x\n", "What is 2+2?,4,\nhi,there,\n"])
def test_csv_rows_with_more_fields_than_the_header_are_an_error_not_a_column_shift(tmp_path, body):
    # pandas' default reads the extra first field as the index: 'prompt' would get the completion
    (tmp_path / "d.csv").write_text("prompt,completion\n" + body)
    with pytest.raises(DataError, match="rows have more fields than its header"):
        read_rows(tmp_path / "d.csv")


def test_a_json_file_holding_one_object_is_named_as_such_not_as_invalid_json(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"data": ROWS, "version": 2}, indent=2))
    with pytest.raises(DataError, match=re.escape("holds one JSON object (keys ['data', 'version']), not rows")):
        read_rows(tmp_path / "d.json")


def test_empty_parquet_is_an_error(tmp_path):
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(DataError, match="has no rows"):
        read_rows(tmp_path / "e.parquet")


def test_directory_without_data_files_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    expected = f"dataset directory {tmp_path} holds no .json, .jsonl, .parquet, .csv files"
    with pytest.raises(DataError, match=re.escape(expected)):
        read_rows(tmp_path)


def test_unsupported_file_type_is_an_error(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"d.txt has an unsupported type; expected one of .json, .jsonl"):
        read_rows(tmp_path / "d.txt")


def test_broken_json_line_names_file_and_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"instruction": "x", \n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert str(info.value).startswith(f"dataset file {path}, line 3: invalid JSON (")


def test_broken_json_list_names_file_and_line_number(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": "1"},\n  {"a": 2,,}\n]\n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert str(info.value).startswith(f"dataset file {path}, line 3: invalid JSON (")


def test_json_line_that_is_not_an_object_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": "1"}\n["a", "b"]\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: expected a JSON object \(one row\), got list"):
        read_rows(path)


def test_corrupt_parquet_is_a_data_error(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read parquet file"):
        read_rows(tmp_path / "d.parquet")


def test_non_utf8_file_is_a_data_error(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"a": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_rows(tmp_path / "d.jsonl")


def rows_as_training_reads_them(path) -> list[dict]:
    """The rows of `path` the way training reads them: texts first (all of them), parsed afterwards."""
    return [parse_row(*text) for text in list(row_texts(path))]


@pytest.mark.parametrize("read", [read_rows, rows_as_training_reads_them])
def test_the_first_bad_line_in_file_order_is_the_error(tmp_path, read):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": "1"}\n{"a": "2"\n{"a": "\xff"}\n')  # line 2 is cut short, line 3 is not UTF-8
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: invalid JSON \(Expecting ',' delimiter, column 10\)$"):
        read(path)
    path.write_bytes(b'{"a": "1"}\n\n{"a": "\xff"}\n{"a": "2"\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 3 is not UTF-8 text: .* at column 8\)$"):
        read(path)


def test_a_json_error_names_its_column_in_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": "1"}\n{"abc": "2", "d": 3\n', encoding="utf-8")  # the closing brace is missing
    with pytest.raises(DataError, match=r"line 2: invalid JSON \(Expecting ',' delimiter, column 20\)$"):
        read_rows(path)
    with pytest.raises(DataError, match=r"line 2: invalid JSON \(Expecting ',' delimiter, column 20\)$"):
        rows_as_training_reads_them(path)


# hub


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub dataset repo as local files of its schema (the same rows in a train split, a test split and a
    files subset), given to `datasets.load_dataset` in place of the repo id; records each call."""
    repo = tmp_path / "repo"
    (repo / "parts").mkdir(parents=True)
    write_jsonl(repo / "train.jsonl", ROWS)
    write_jsonl(repo / "test.jsonl", ROWS[::-1])
    write_jsonl(repo / "parts" / "part-1.jsonl", ROWS[1:])
    calls, load_dataset = [], datasets.load_dataset

    def from_repo(path, **kwargs):
        calls.append((path, kwargs))
        local = {k: v for k, v in kwargs.items() if k != "revision"}
        if local["data_files"] is None:
            local["data_files"] = {"train": str(repo / "train.jsonl"), "test": str(repo / "test.jsonl")}
        else:
            local["data_files"] = str(repo / local["data_files"])
        return load_dataset("json", cache_dir=str(tmp_path / "hf"), **local)

    monkeypatch.setattr(datasets, "load_dataset", from_repo)
    return calls


def test_hub_id_without_revision_explains_pinning(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub was called"))
    with pytest.raises(ConfigError) as info:
        hub_dataset("timdettmers/openassistant-guanaco", revision=None)
    message = str(info.value)
    assert message.startswith("'timdettmers/openassistant-guanaco' is not a local path, so it is read as a")
    assert "pinned revision (a commit sha or tag)" in message
    assert "cannot be reproduced" in message


@pytest.mark.parametrize("num_proc", [1, 2])
def test_hub_max_rows_selects_the_first_rows_and_reading_maps_only_them(hub, tmp_path, num_proc):
    from sft.data import read_source
    from sft.sources import Source

    assert hub_dataset("owner/name", revision="v1.0", max_rows=2).to_list() == ROWS[:2]
    got = read_source(Source("owner/name", None, "alpaca", "v1.0", None, "train", 2, "owner/name"), num_proc,
                      tmp_path / "read")
    assert got.read["rows_read"] == len(got.texts) == 2
    assert json.loads(got.texts[1]["conversation"])[-1] == {"role": "assistant", "content": ROWS[1]["output"]}
    assert hub_dataset("owner/name", revision="v1.0", max_rows=100).to_list() == ROWS


def test_hub_load_is_pinned_streams_only_a_first_rows_trial_and_takes_its_split_and_files(hub):
    assert hub_dataset("owner/name", revision="v1.0", max_rows=2).to_list() == ROWS[:2]
    assert hub_dataset("owner/name", revision="abc123", split="test").to_list() == ROWS[::-1]
    assert hub_dataset("owner/name", revision="abc123", max_rows=2).to_list() == ROWS[:2]
    assert hub_dataset("owner/name", revision="abc123", data_files="parts/part-1.jsonl").to_list() == ROWS[1:]
    assert hub == [
        ("owner/name", {"revision": "v1.0", "split": "train", "streaming": True, "data_files": None}),
        ("owner/name", {"revision": "abc123", "split": "test", "streaming": False, "data_files": None}),
        ("owner/name", {"revision": "abc123", "split": "train", "streaming": True, "data_files": None}),
        ("owner/name", {"revision": "abc123", "split": "train", "streaming": False,
                        "data_files": "parts/part-1.jsonl"}),
    ]


def test_hub_failure_is_a_data_error_with_the_original_message(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        hub_dataset("owner/name", revision="abc123")
    assert str(info.value) == (
        "could not fetch dataset 'owner/name' (revision 'abc123', split 'train') from the hub: "
        "Couldn't reach 'owner/name' on the Hub (LocalEntryNotFoundError)"
    )


def test_hub_dataset_with_no_rows_is_an_error(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([]))
    with pytest.raises(DataError, match="dataset owner/name has no rows"):
        hub_dataset("owner/name", revision="abc123")


# shuffling and held-out split

ITEMS = list(range(100))


def test_shuffle_rows_is_deterministic_and_leaves_the_input_alone():
    items = list(ITEMS)
    assert shuffle_rows(items, 0) == shuffle_rows(items, 0)
    assert shuffle_rows(items, 0) != shuffle_rows(items, 1)
    assert sorted(shuffle_rows(items, 0)) == ITEMS
    assert items == ITEMS


def test_split_is_deterministic_for_a_seed_and_differs_across_seeds():
    train, heldout = split_heldout(ITEMS, eval_rows=10, seed=0)
    assert (train, heldout) == split_heldout(ITEMS, eval_rows=10, seed=0)
    assert heldout != split_heldout(ITEMS, eval_rows=10, seed=1)[1]
    assert len(heldout) == 10 and len(train) == 90
    assert sorted(train + heldout) == ITEMS


def test_heldout_is_a_random_sample_not_the_head_or_tail():
    _, heldout = split_heldout(ITEMS, eval_rows=10, seed=0)
    assert set(heldout) != set(ITEMS[-10:])
    assert set(heldout) != set(ITEMS[:10])


def test_fraction_split():
    train, heldout = split_heldout(ITEMS, eval_rows=0.25, seed=3)
    assert len(heldout) == 25 and len(train) == 75
    assert sorted(train + heldout) == ITEMS


@pytest.mark.parametrize(
    "eval_rows, message",
    [
        (0, "eval_rows must be a positive row count or a fraction in (0, 1), got 0"),
        (-5, "eval_rows must be a positive row count or a fraction in (0, 1), got -5"),
        (True, "eval_rows must be a positive row count or a fraction in (0, 1), got True"),
        ("10", "eval_rows must be a positive row count or a fraction in (0, 1), got '10'"),
        (1.0, "eval_rows as a fraction must be between 0 and 1 (exclusive), got 1.0"),
        (0.0, "eval_rows as a fraction must be between 0 and 1 (exclusive), got 0.0"),
        (0.001, "eval_rows=0.001 of 100 rows rounds to 0 held-out rows; hold out at least one"),
        (100, "eval_rows=100 holds out 100 of 100 rows, leaving no rows to train on"),
        (0.999, "eval_rows=0.999 holds out 100 of 100 rows, leaving no rows to train on"),
    ],
)
def test_bad_eval_rows(eval_rows, message):
    with pytest.raises(ConfigError) as info:
        split_heldout(ITEMS, eval_rows=eval_rows, seed=0)
    assert str(info.value) == message
