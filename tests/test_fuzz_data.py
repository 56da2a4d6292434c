r"""Malformed dataset files through the real data pipeline (`prepare_data`, and `main` end to end): each one
ends in an SFTError whose message names the cause (with the file and line or item where there is one), or
in rows skipped and counted in the stats. Never a raw KeyError/TypeError/UnicodeDecodeError/JSONDecodeError/
ArrowInvalid, and never a bad row kept without a count.

The hand-made cases (`CASES`). A bad file holds 20 good rows and then the bad part, unless the input
says otherwise. "counted": it loads, with the rows kept and the rejects by reason as shown. Every DataError
names the dataset (its path or hub id).

| case                            | input                                  | outcome                                   |
|---------------------------------|----------------------------------------|-------------------------------------------|
| jsonl_truncated_line            | line 21 cut off inside a key           | DataError: file, line 21: invalid JSON    |
| jsonl_line_not_an_object        | line 21 is `42`                        | DataError: file, line 21: not an object   |
| jsonl_huge_integer              | line 21 holds a 5000-digit integer     | DataError: line 21: can't parse (digits)  |
| jsonl_deep_nesting              | line 21 nests lists 100000 deep        | DataError: line 21: can't parse (depth)   |
| jsonl_lone_surrogate            | a reply holds the escape \ud800        | DataError: line 21: lone surrogate        |
| json_list_missing_comma         | indented .json list, a comma missing   | DataError: file, line 230: invalid JSON   |
| json_list_item_not_an_object    | item 20 of the .json list is a string  | DataError: file, item 20: not an object   |
| json_list_deep_nesting          | a .json list item nests 100000 deep    | DataError: file: cannot parse (depth)     |
| json_list_lone_surrogate        | item 20's reply is the escape \udfff   | DataError: item 20: lone surrogate        |
| content_wrong_types             | content 7, ["a"], null, {"a": 1}       | counted: 20 kept; wrong_type 4            |
| messages_wrong_types            | messages a string, dict, null, 3       | counted: 20 kept; wrong_type 4            |
| role_missing_or_not_a_string    | no role; role 1                        | counted: missing_field 1, wrong_type 1    |
| empty_strings                   | content ""; reply ""; role ""          | counted: empty_content 2, unknown_role 1  |
| whitespace_only_reply           | reply " \n\t "                         | counted: 20 kept; empty_content 1         |
| every_reject_reason_once        | one row per reject reason (13)         | counted: 20 kept; each reason 1           |
| every_row_malformed             | only 5 rows, all bad                   | DataError: none of its 5 rows is usable   |
| huge_reply_too_long_error       | 2 MB reply, too_long="error"           | DataError: 400036 tokens, max_length 128  |
| huge_reply_too_long_drop        | 2 MB reply, too_long="drop"            | counted: 21 kept; too_long 1 dropped      |
| jsonl_invalid_utf8              | byte 0xff in line 21                   | DataError: line 21 not UTF-8, column 47   |
| csv_invalid_utf8                | byte 0xe9 (Latin-1) in CSV line 22     | DataError: line 22 not UTF-8, column 4    |
| utf16_file                      | the good rows saved as UTF-16          | DataError: line 1 not UTF-8, column 1     |
| jsonl_bom                       | byte order mark before line 1          | counted: 20 kept; nothing rejected        |
| json_list_bom                   | byte order mark before the .json list  | counted: 20 kept; nothing rejected        |
| csv_bom                         | byte order mark before the CSV header  | counted: 20 kept; nothing rejected        |
| bom_mid_file                    | a second BOM opens line 21             | DataError: line 21: invalid JSON (BOM)    |
| missing_file                    | a .jsonl path that does not exist      | DataError: path ... does not exist        |
| empty_file                      | a 0-byte .jsonl                        | DataError: dataset ... has no rows        |
| blank_lines_only                | a .jsonl of blank lines                | DataError: dataset ... has no rows        |
| empty_json_list                 | a .json holding `[]`                   | DataError: dataset ... has no rows        |
| directory_without_data          | a folder of README.md and notes.txt    | DataError: folder holds no data files     |
| unsupported_file_type           | a .txt file                            | DataError: file has an unsupported type   |
| csv_header_only                 | a CSV header and no rows               | DataError: dataset ... has no rows        |
| csv_missing_column              | a CSV with only a `prompt` column      | DataError: cannot detect format (no path) |
| csv_named_format_missing_column | same, format "prompt_completion"       | DataError: format needs columns [...]     |
| csv_extra_field                 | CSV line 22 has 3 fields, header 2     | DataError: Expected 2 fields in line 22   |
| csv_short_row                   | a CSV row with no completion cell      | counted: 20 kept; empty_content 1         |
| parquet_messages_as_text        | messages column is JSON text           | DataError: none of 20 usable (wrong_type) |
| parquet_numeric_prompt          | prompt column is int64                 | DataError: none of 20 usable (wrong_type) |
| parquet_null_content            | list<struct> messages, 2 null contents | counted: 20 kept; wrong_type 2            |
| parquet_corrupt                 | bytes that are not parquet             | DataError: cannot read parquet file       |
| parquet_date_out_of_range       | a timestamp past year 9999 in row 20   | DataError: column 'created' ... (range)   |
| parquet_string_not_utf8         | a string column holding byte 0xe9      | DataError: column 'prompt' ... (utf-8)    |
| guanaco_without_markers         | a text without ### Human:/Assistant:   | counted: not_starting_with_user 1         |
| sharegpt_bad_turns              | from "bot"; value null; no value       | counted: 1 each of 3 reasons              |
| few_rows_left_default_eval      | 5 good rows of 30, eval_rows unset     | ConfigError: 0.05 of 5 rows rounds to 0   |
| unknown_dataset_format          | dataset_format="orca"                  | ConfigError: 'orca' is not one of ...     |
| named_format_wrong_columns      | messages file, format "alpaca"         | DataError: format needs columns [...]     |
| unknown_embedded_dataset        | dataset="embedded:nope"                | DataError: unknown embedded dataset       |
| hub_id_without_revision         | owner/name id, no revision             | ConfigError: needs a pinned revision      |
| hub_fetch_fails                 | pinned hub id, the download fails      | DataError: could not fetch from the hub   |

Seeded random mutations of a valid JSONL file (`test_random_mutations...`): 100 mutants of 12 rows, each
with 1 to 3 edits (cut a line, delete a few bytes, insert garbage, give a value another type, rename a
key, duplicate or delete a line). Observed: 55 load, 34 of them with rejected rows, and in each one
kept + rejected == rows read == non-blank lines; 45 stop with a DataError (43 invalid JSON, 1 lone
surrogate, 1 conversation over max_length; the mutant whose first bad line is cut JSON before a line
that is not UTF-8 reports the JSON line, the first in the file's order).

Seeded random byte damage to valid CSV and parquet files (`test_random_byte_damage...`), 50 mutants each:
CSV, 7 load (2 with rejected rows, all counted) and 43 stop with an SFTError (33 CSV parse errors, 8 not
UTF-8, 1 no rows, 1 no known format; before rows with extra fields became a parse error, one of the 33 was
read shifted by a column and stopped later, on too few rows for the held-out split); parquet, all 50 stop
with "cannot read parquet file" (before the fix, 22 of them escaped as a raw OSError).

Seeded random conversations with reasoning and tool use (`test_random_reasoning...`), straight through
`sft.formats`: 3000 agent conversations (a user turn, tool calls and their results, a reply, repeated; tool
calls in every convention, arguments as objects and as JSON text, reasoning in keys and in <think> blocks),
0 to 3 edits each (a key set to a random value, a key or a turn deleted, a turn duplicated), a third of them
in LLaMA-Factory's sharegpt layout with a system column and tools as JSON text. Each one normalizes (the
normalized form checked: known keys only, optional keys only with a value, the same after a second
validation) or raises MalformedRow, never another exception. Observed: 823 normalize (689 with tool calls,
368 with reasoning, 156 with keys reported as ignored); the other 2177 are rejected, each of the 13 reasons
at least 21 times.

End to end (`test_experiment_script...`, `main` in a subprocess): a broken JSON line and a lone surrogate
each print exactly one line, `error: dataset file <path>, line 21: ...`, on stderr and exit with code 2.
"""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sft import formats
from sft.data import prepare_data
from sft.errors import ConfigError, DataError, SFTError

ROOT = Path(__file__).resolve().parents[1]


def chat(user, reply, system=None) -> dict:
    head = [{"role": "system", "content": system}] if system is not None else []
    return {"messages": head + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


GOOD = [chat(f"What is {i} + {i}?", str(2 * i)) for i in range(20)]


def jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def write(path: Path, content: str | bytes) -> str:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def csv_text(rows: list[str]) -> str:
    return "prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(20)) + "".join(r + "\n" for r in rows)


def parquet(path: Path, table: pa.Table) -> str:
    pq.write_table(table, path)
    return str(path)


@dataclass
class Fails:
    error: type[SFTError]
    message: str  # a regex; `{path}` stands for the dataset path, escaped


@dataclass
class Counted:
    kept: int
    rejected: dict
    too_long: int = 0  # conversations dropped by too_long="drop", train and held-out together


# The messages that do not yet say which dataset they are about (sft.data raises both without its name).
NAMES_NO_DATASET: set[str] = set()

# Each case builds its input under a folder and returns the config overrides that point at it.
Build = Callable[[Path], dict]


def lines_with(bad: list) -> Build:
    return lambda d: {"dataset": write(d / "d.jsonl", jsonl(GOOD + bad))}


def raw_jsonl(tail: bytes, head: bytes = b"") -> Build:
    return lambda d: {"dataset": write(d / "d.jsonl", head + jsonl(GOOD).encode() + tail)}


def json_list(items: list) -> Build:
    return lambda d: {"dataset": write(d / "d.json", json.dumps(items))}


def drop_comma_before_item(text: str, index: int) -> str:
    """An indented JSON list (indent=1) without the comma that separates item `index` from the one before."""
    starts = [m.start() for m in re.finditer(r"\n \{", text)]
    cut = text.rindex(",", 0, starts[index])
    return text[:cut] + text[cut + 1:]


def huge_reply(too_long: str) -> Build:
    return lambda d: {"dataset": write(d / "d.jsonl", jsonl(GOOD + [chat("Say it.", "word " * 400_000)])),
                      "too_long": too_long}


DEEP = "[" * 100_000 + "]" * 100_000
MESSAGES_WITH_PARQUET_NULL = pa.table({"messages": pa.array(
    [m["messages"] for m in GOOD] + [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]] * 2,
    type=pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))})

CASES: dict[str, tuple[Build, Fails | Counted]] = {
    "jsonl_truncated_line": (
        lines_with(['{"messages": [{"role": "user", "cont'] + GOOD[:1]),
        Fails(DataError, r"dataset file {path}, line 21: invalid JSON \(")),
    "jsonl_line_not_an_object": (
        lines_with(["42"]), Fails(DataError, r"{path}, line 21: expected a JSON object \(one row\), got int")),
    "jsonl_huge_integer": (
        lines_with(['{"messages": ' + "9" * 5000 + "}"]),
        Fails(DataError, r"{path}, line 21: cannot parse JSON \(Exceeds the limit \(4300 digits\)")),
    "jsonl_deep_nesting": (
        lines_with(['{"messages": ' + DEEP + "}"]),
        Fails(DataError, r"{path}, line 21: cannot parse JSON \(maximum recursion depth exceeded")),
    "jsonl_lone_surrogate": (
        lines_with([json.dumps(chat("Hi", "X")).replace('"X"', '"a \\ud800 b"')]),
        Fails(DataError, r"{path}, line 21: the escape \\ud800 is half of a UTF-16 surrogate pair without its other "
                         r"half, so the text is not valid Unicode$")),
    "json_list_missing_comma": (
        lambda d: {"dataset": write(d / "d.json", drop_comma_before_item(json.dumps(GOOD, indent=1), 19))},
        Fails(DataError, r"dataset file {path}, line 230: invalid JSON \(Expecting ',' delimiter")),
    "json_list_item_not_an_object": (
        json_list(GOOD + ["just text"]),
        Fails(DataError, r"{path}, item 20: expected a JSON object \(one row\), got str")),
    "json_list_deep_nesting": (
        lambda d: {"dataset": write(d / "d.json", json.dumps(GOOD)[:-1] + ', {"messages": ' + DEEP + "}]")},
        Fails(DataError, r"dataset file {path}: cannot parse JSON \(maximum recursion depth exceeded")),
    "json_list_lone_surrogate": (
        lambda d: {"dataset": write(d / "d.json", json.dumps(GOOD + [chat("Hi", "X")]).replace('"X"', '"\\udfff"'))},
        Fails(DataError, r"{path}, item 20: the escape \\udfff is half of a UTF-16 surrogate pair")),
    "content_wrong_types": (
        lines_with([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": c}]}
                    for c in (7, ["a"], None, {"a": 1})]),
        Counted(20, {"wrong_type": 4})),
    "messages_wrong_types": (
        lines_with([{"messages": m} for m in ("hi", {"role": "user", "content": "hi"}, None, 3)]),
        Counted(20, {"wrong_type": 4})),
    "role_missing_or_not_a_string": (
        lines_with([{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
                    {"messages": [{"role": 1, "content": "hi"}, {"role": "assistant", "content": "x"}]}]),
        Counted(20, {"missing_field": 1, "wrong_type": 1})),
    "empty_strings": (
        lines_with([chat("", "x"), chat("hi", ""),
                    {"messages": [{"role": "", "content": "hi"}, {"role": "assistant", "content": "x"}]}]),
        Counted(20, {"empty_content": 2, "unknown_role": 1})),
    "whitespace_only_reply": (lines_with([chat("hi", " \n\t ")]), Counted(20, {"empty_content": 1})),
    "every_reject_reason_once": (
        lines_with([
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]},
            chat("hi", "   "),
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
            {"messages": chat("hi", "x")["messages"] + [{"role": "system", "content": "s"}]},
            {"messages": [{"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "<think>r</think>x", "reasoning": "r"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"name": ""}]}]},
            {"messages": chat("hi", "x")["messages"] + [{"role": "tool", "content": "r"}]},
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "tool_calls": [{"name": "f", "arguments": {}}]},
                          {"role": "assistant", "content": "x"}]},
            {**chat("hi", "x"), "tools": "[{"},
        ]),
        Counted(20, {r: 1 for r in formats.REJECT_REASONS})),
    "every_row_malformed": (
        lambda d: {"dataset": write(d / "d.jsonl", jsonl([chat("hi", " "), chat("", "x"), {"messages": None},
                                                          {"messages": [{"role": "user", "content": "q"}]},
                                                          {"messages": [{"role": "bot", "content": "x"}]}]))},
        Fails(DataError, r"dataset {path}: none of its 5 rows is a usable messages conversation \(rejected by "
                         r"reason: \{'empty_content': 2, 'wrong_type': 1, 'no_assistant_turn': 1, "
                         r"'unknown_role': 1\}\)")),
    "huge_reply_too_long_error": (
        huge_reply("error"),
        Fails(DataError, r"train row \d+ has 400036 tokens, more than max_length=128; raise max_length")),
    "huge_reply_too_long_drop": (huge_reply("drop"), Counted(21, {}, too_long=1)),
    "jsonl_invalid_utf8": (
        raw_jsonl(b'{"messages": [{"role": "user", "content": "caf\xff"}]}\n' + jsonl(GOOD[:2]).encode()),
        Fails(DataError, r"dataset file {path}, line 21 is not UTF-8 text: invalid start byte "
                         r"\(byte 0xff at column 47\)$")),
    "csv_invalid_utf8": (
        lambda d: {"dataset": write(d / "d.csv", csv_text([]).encode() + b"caf\xe9,x\n")},
        Fails(DataError, r"dataset file {path}, line 22 is not UTF-8 text: invalid continuation byte "
                         r"\(byte 0xe9 at column 4\)$")),
    "utf16_file": (lambda d: {"dataset": write(d / "d.jsonl", jsonl(GOOD).encode("utf-16"))},
                   Fails(DataError, r"dataset file {path}, line 1 is not UTF-8 text: invalid start byte "
                                    r"\(byte 0xff at column 1\)$")),
    "jsonl_bom": (raw_jsonl(b"", head=b"\xef\xbb\xbf"), Counted(20, {})),
    "json_list_bom": (lambda d: {"dataset": write(d / "d.json", b"\xef\xbb\xbf" + json.dumps(GOOD).encode())},
                      Counted(20, {})),
    "csv_bom": (lambda d: {"dataset": write(d / "d.csv", b"\xef\xbb\xbf" + csv_text([]).encode())}, Counted(20, {})),
    "bom_mid_file": (
        raw_jsonl(b"\xef\xbb\xbf" + jsonl(GOOD[:1]).encode()),
        Fails(DataError, r"{path}, line 21: invalid JSON \(Unexpected UTF-8 BOM")),
    "missing_file": (lambda d: {"dataset": str(d / "nope.jsonl")},
                     Fails(DataError, r"dataset path {path} does not exist")),
    "empty_file": (lambda d: {"dataset": write(d / "d.jsonl", "")}, Fails(DataError, r"dataset {path} has no rows")),
    "blank_lines_only": (lambda d: {"dataset": write(d / "d.jsonl", "\n  \n\n")},
                         Fails(DataError, r"dataset {path} has no rows")),
    "empty_json_list": (lambda d: {"dataset": write(d / "d.json", "[]")},
                        Fails(DataError, r"dataset {path} has no rows")),
    "directory_without_data": (
        lambda d: (write(d / "README.md", "# data"), write(d / "notes.txt", "x"), {"dataset": str(d)})[-1],
        Fails(DataError, r"dataset directory {path} holds no \.json, \.jsonl, \.parquet, \.csv files")),
    "unsupported_file_type": (lambda d: {"dataset": write(d / "d.txt", "hi")},
                              Fails(DataError, r"dataset file {path} has an unsupported type")),
    "csv_header_only": (lambda d: {"dataset": write(d / "d.csv", "prompt,completion\n")},
                        Fails(DataError, r"dataset {path} has no rows")),
    "csv_missing_column": (
        lambda d: {"dataset": write(d / "d.csv", "prompt\n" + "hi\n" * 5)},
        Fails(DataError, r"cannot detect the dataset format from its columns \['prompt'\]")),
    "csv_named_format_missing_column": (
        lambda d: {"dataset": write(d / "d.csv", "prompt\n" + "hi\n" * 5), "dataset_format": "prompt_completion"},
        Fails(DataError, r"dataset {path}: format 'prompt_completion' needs the columns \['prompt', 'completion'\], "
                         r"found \['prompt'\]")),
    "csv_extra_field": (
        lambda d: {"dataset": write(d / "d.csv", csv_text(["a,b,c"]))},
        Fails(DataError, r"cannot parse CSV file {path}: Error tokenizing data. C error: Expected 2 fields in line 22, "
                         r"saw 3$")),
    "csv_short_row": (lambda d: {"dataset": write(d / "d.csv", csv_text(["only a prompt"]))},
                      Counted(20, {"empty_content": 1})),
    "parquet_messages_as_text": (
        lambda d: {"dataset": parquet(d / "d.parquet",
                                      pa.table({"messages": [json.dumps(r["messages"]) for r in GOOD]}))},
        Fails(DataError, r"none of its 20 rows is a usable messages conversation \(rejected by reason: "
                         r"\{'wrong_type': 20\}\)")),
    "parquet_numeric_prompt": (
        lambda d: {"dataset": parquet(d / "d.parquet", pa.table({"prompt": list(range(20)),
                                                                  "completion": [f"a{i}" for i in range(20)]}))},
        Fails(DataError, r"none of its 20 rows is a usable prompt_completion conversation \(rejected by reason: "
                         r"\{'wrong_type': 20\}\)")),
    "parquet_null_content": (lambda d: {"dataset": parquet(d / "d.parquet", MESSAGES_WITH_PARQUET_NULL)},
                             Counted(20, {"wrong_type": 2})),
    "parquet_corrupt": (lambda d: {"dataset": write(d / "d.parquet", b"PAR1 not really PAR1")},
                        Fails(DataError, r"cannot read parquet file {path}: ")),
    "parquet_date_out_of_range": (
        lambda d: {"dataset": parquet(d / "d.parquet", pa.table({
            "prompt": pa.array([f"q{i}" for i in range(20)]), "completion": [f"a{i}" for i in range(20)],
            "created": pa.array([0] * 19 + [2**50], type=pa.timestamp("ms"))}))},
        Fails(DataError, r"cannot read parquet file {path}: column 'created' holds a value Python cannot "
                         r"represent \(date value out of range\)$")),
    "parquet_string_not_utf8": (
        lambda d: {"dataset": parquet(d / "d.parquet", pa.table({
            "prompt": pa.array([b"q"] * 19 + [b"caf\xe9"], pa.binary()).view(pa.string()),
            "completion": [f"a{i}" for i in range(20)]}))},
        Fails(DataError, r"cannot read parquet file {path}: column 'prompt' holds a value Python cannot "
                         r"represent \('utf-8' codec can't decode byte 0xe9")),
    "guanaco_without_markers": (
        lambda d: {"dataset": write(d / "d.jsonl", jsonl(
            [{"text": f"### Human: q{i} ### Assistant: a{i}"} for i in range(20)] + [{"text": "just some prose"}]))},
        Counted(20, {"not_starting_with_user": 1})),
    "sharegpt_bad_turns": (
        lambda d: {"dataset": write(d / "d.jsonl", jsonl(
            [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
             for i in range(20)]
            + [{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
               {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]},
               {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}]))},
        Counted(20, {"unknown_role": 1, "wrong_type": 1, "missing_field": 1})),
    "few_rows_left_default_eval": (
        lambda d: {"dataset": write(d / "d.jsonl", jsonl(GOOD[:5] + [chat("q", " ")] * 25)), "eval_rows": None},
        Fails(ConfigError, r"eval_rows=0\.05 of 5 rows rounds to 0 held-out rows")),
    "unknown_dataset_format": (
        lambda d: {"dataset": write(d / "d.jsonl", jsonl(GOOD)), "dataset_format": "orca"},
        Fails(ConfigError, r"dataset_format: 'orca' is not one of 'auto', 'messages', 'sharegpt', "
                           r"'prompt_completion', 'dolphin', 'alpaca', 'guanaco'$")),
    "named_format_wrong_columns": (
        lambda d: {"dataset": write(d / "d.jsonl", jsonl(GOOD)), "dataset_format": "alpaca"},
        Fails(DataError, r"dataset {path}: format 'alpaca' needs the columns \['instruction', 'output'\], "
                         r"found \['messages'\]")),
    "unknown_embedded_dataset": (lambda d: {"dataset": "embedded:nope"},
                                 Fails(DataError, r"unknown embedded dataset 'embedded:nope'")),
    "hub_id_without_revision": (
        lambda d: {"dataset": "someone/some-dataset"},
        Fails(ConfigError, r"'someone/some-dataset' is not a local path, .* needs a pinned revision")),
    "hub_fetch_fails": (
        lambda d: {"dataset": "someone/some-dataset", "dataset_revision": "abc123"},
        Fails(DataError, r"could not fetch dataset 'someone/some-dataset' \(revision 'abc123', split 'train'\) "
                         r"from the hub: no network, try again later$")),
}


pytestmark = pytest.mark.usefixtures("cache_dir")  # an empty tokenization cache for every test


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("no network,\n  try again later")  # hub errors often span lines

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def outcome(make_config, tokenizer, **settings):
    """("loaded", stats) or ("error", the SFTError); any other exception escapes and fails the test."""
    try:
        return "loaded", prepare_data(make_config(**settings), tokenizer).stats
    except SFTError as e:
        return "error", e


def check_counts(stats: dict) -> None:
    """No row vanishes: every row read is kept or rejected, every kept one is an example or a counted drop."""
    assert stats["rows_kept"] + sum(stats["rows_rejected"].values()) == stats["rows_read"]
    assert stats["train_conversations"] + stats["eval_conversations"] == stats["rows_kept"]
    for split in ("train", "eval"):
        conversations = stats[f"{split}_conversations"]
        assert stats[split]["examples"] + sum(stats[split]["dropped"].values()) == conversations


def test_table_in_the_docstring_lists_exactly_the_cases():
    rows = re.findall(r"^\| (\w+)\s*\|", __doc__, re.MULTILINE)
    assert rows[0] == "case" and rows[1:] == list(CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_is_a_clear_error_or_a_counted_skip(tiny_config, tokenizer, tmp_path, case):
    build, expected = CASES[case]
    folder = tmp_path / "data"
    folder.mkdir()
    settings = {"eval_rows": 2, **build(folder)}
    kind, result = outcome(tiny_config, tokenizer, **settings)
    if isinstance(expected, Fails):
        assert kind == "error", f"accepted silently: {result}"
        assert isinstance(result, expected.error), result  # NotUTF8 is a DataError that knows its line
        message = str(result)
        assert "\n" not in message and "Traceback" not in message
        assert re.search(expected.message.replace("{path}", re.escape(settings["dataset"])), message), message
        if expected.error is DataError:
            assert (settings["dataset"] in message) == (case not in NAMES_NO_DATASET)
    else:
        assert kind == "loaded", f"{type(result).__name__}: {result}"
        check_counts(result)
        assert (result["rows_kept"], result["rows_rejected"]) == (expected.kept, expected.rejected)
        too_long = result["train"]["dropped"].get("too_long", 0) + result["eval"]["dropped"].get("too_long", 0)
        assert too_long == expected.too_long
        assert result["train"]["examples"] + result["eval"]["examples"] == expected.kept - expected.too_long


# Seeded random mutations of a valid file.

BASE = [chat(f"Spell {w}.", " ".join(w.upper()), system="Answer briefly." if i % 3 == 0 else None)
        for i, w in enumerate("apple bird cat dog egg fish goat hat ink jam kite lamp".split())]
GARBAGE = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"null", b"1e999", b"NaN", b"\xff", b"\xc3", b"\x00",
           b"\xef\xbb\xbf", b'"\\ud800"', b"\\ud83d", b"9" * 5000, b'{"messages": 1}', b"\n", b"\n\n", b"   "]
VALUES = [0, -1.5, True, None, [], ["x"], {}, {"role": "user"}, "", "   ", "user", "assistant", "system", "bot",
          "x" * 3000]


def swap_type(rng: random.Random, line: bytes) -> bytes:
    """Replaces one value of a row (the messages list, a message, a role or a content) with one of another type."""
    try:
        row = json.loads(line)
        messages = row["messages"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return line
    if not isinstance(messages, list) or not messages or rng.random() < 0.2:
        row["messages"] = rng.choice(VALUES)
    else:
        i = rng.randrange(len(messages))
        if not isinstance(messages[i], dict) or rng.random() < 0.2:
            messages[i] = rng.choice(VALUES)
        else:
            messages[i][rng.choice(["role", "content"])] = rng.choice(VALUES)
    return json.dumps(row).encode()


def drop_key(rng: random.Random, line: bytes) -> bytes:
    keys = list(re.finditer(rb'"(role|content|messages)": ', line))
    if not keys:
        return line
    m = rng.choice(keys)
    return line[:m.start()] + b'"' + m.group(1)[::-1] + b'": ' + line[m.end():]


def mutate(rng: random.Random, lines: list[bytes]) -> tuple[list[bytes], list[str]]:
    lines, done = list(lines), []
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        line = lines[i]
        kind = rng.choice(["cut", "delete", "insert", "swap", "swap", "drop_key", "duplicate", "remove"])
        at = rng.randrange(len(line) + 1)
        if kind == "cut":
            lines[i] = line[:at]
        elif kind == "delete":
            lines[i] = line[:at] + line[at + rng.randint(1, 8):]
        elif kind == "insert":
            lines[i] = line[:at] + rng.choice(GARBAGE) + line[at:]
        elif kind == "swap":
            lines[i] = swap_type(rng, line)
        elif kind == "drop_key":
            lines[i] = drop_key(rng, line)
        elif kind == "duplicate":
            lines.insert(i, line)
        elif len(lines) > 1:
            del lines[i]
        done.append(f"{kind} line {i + 1}")
    return lines, done


def test_random_mutations_end_in_an_error_or_fully_counted_rows(tiny_config, tokenizer, tmp_path):
    rng = random.Random(20240607)
    base = [json.dumps(r).encode() for r in BASE]
    loaded = with_rejects = errors = 0
    reasons = Counter()
    for n in range(100):
        lines, done = mutate(rng, base)
        content = b"\n".join(lines) + b"\n"
        path = tmp_path / f"mutant{n}.jsonl"
        path.write_bytes(content)
        try:
            kind, result = outcome(tiny_config, tokenizer, dataset=str(path), eval_rows=2)
        except Exception as e:
            pytest.fail(f"mutant {n} ({', '.join(done)}) raised {type(e).__name__}: {e}\n{content[:2000]!r}")
        if kind == "error":
            errors += 1
            assert isinstance(result, DataError), f"mutant {n}: {result!r}"
            message = str(result)
            assert "\n" not in message, f"mutant {n}: {message}"
            # The length check names the conversation, not the file and row (sft.data tokenizes after the split).
            assert str(path) in message or re.match(r"(train|held-out) row \d+ has \d+ tokens", message), (
                f"mutant {n}: {message}")
            reasons[_reason(message)] += 1
            continue
        loaded += 1
        with_rejects += bool(result["rows_rejected"])
        check_counts(result)
        lines_read = re.split(r"\r\n|\r|\n", content.decode("utf-8-sig"))  # text mode's universal newlines
        assert result["rows_read"] == sum(bool(line.strip()) for line in lines_read), f"mutant {n}: {', '.join(done)}"
    # The observed split, written in the module docstring: pinned so that the two change together.
    assert (loaded, with_rejects, errors) == (55, 34, 45)
    assert reasons == {"invalid JSON": 43, "lone surrogate": 1, "too long": 1}


def damage(rng: random.Random, data: bytes) -> bytes:
    """1 to 4 random byte edits: overwrite, delete a run, insert a separator or junk, or cut the tail."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        kind = rng.choice(["overwrite", "delete", "insert", "cut"])
        if kind == "overwrite":
            data[i:i + 4] = bytes(rng.randrange(256) for _ in range(4))
        elif kind == "delete":
            del data[i:i + rng.randint(1, 20)]
        elif kind == "insert":
            data[i:i] = rng.choice([b'"', b",", b"\n", b"\r", b"\x00", b"\xff", b"\xc3("])
        else:
            del data[i:]
    return bytes(data)


@pytest.mark.parametrize("suffix, observed", [  # the observed outcomes, as in the module docstring
    (".csv", {"loaded": 7, "with_rejects": 2, "CSV parse error": 33, "not UTF-8": 8, "no rows": 1,
              "no known format": 1}),
    (".parquet", {"parquet read error": 50}),
])
def test_random_byte_damage_to_csv_and_parquet_ends_in_an_error_or_counted_rows(tiny_config, tokenizer, tmp_path,
                                                                                 suffix, observed):
    rows = [{"prompt": f'Say "{i}", then stop.', "completion": f"{i}\nstop"} for i in range(20)]
    valid = tmp_path / f"valid{suffix}"
    if suffix == ".csv":
        valid.write_text("prompt,completion\n" + "".join(
            '"{}","{}"\n'.format(*(v.replace('"', '""') for v in r.values())) for r in rows))
    else:
        pq.write_table(pa.table({"messages": [[{"role": "user", "content": r["prompt"]},
                                               {"role": "assistant", "content": r["completion"]}] for r in rows]}),
                       valid)
    rng = random.Random(7)
    seen = Counter()
    for n in range(50):
        path = tmp_path / f"mutant{n}{suffix}"
        path.write_bytes(damage(rng, valid.read_bytes()))
        try:
            kind, result = outcome(tiny_config, tokenizer, dataset=str(path), eval_rows=2)
        except Exception as e:
            pytest.fail(f"mutant {n} raised {type(e).__name__}: {e}")
        if kind == "error":
            seen[_reason(str(result))] += 1
            assert isinstance(result, SFTError) and "\n" not in str(result), f"mutant {n}: {result!r}"
            continue
        seen["loaded"] += 1
        seen["with_rejects"] += bool(result["rows_rejected"])
        check_counts(result)
    assert seen == Counter(observed)


def _reason(message: str) -> str:
    for reason, words in (("invalid JSON", "invalid JSON"), ("cannot parse JSON", "cannot parse JSON"),
                          ("not an object", "expected a JSON object"), ("not UTF-8", "is not UTF-8 text"),
                          ("lone surrogate", "surrogate pair"), ("too long", "more than max_length"),
                          ("no usable row", "none of its"), ("CSV parse error", "cannot parse CSV"),
                          ("parquet read error", "cannot read parquet"), ("no rows", "has no rows"),
                          ("no known format", "cannot detect the dataset format"), ("eval split", "eval_rows")):
        if words in message:
            return reason
    return message


# End to end: what a user running an experiment script sees.

E2E = {
    "broken_json_line": (lambda d: write(d / "d.jsonl", jsonl(GOOD) + '{"messages": [\n'),
                         r"error: dataset file {path}, line 21: invalid JSON \("),
    "lone_surrogate": (lambda d: write(d / "d.jsonl", jsonl(GOOD) + '{"messages": "\\udc80"}\n'),
                       r"error: dataset file {path}, line 21: the escape \\udc80 is half of a UTF-16 surrogate pair"),
}


@pytest.fixture(scope="module")
def e2e_runs(tiny_model_dir, tmp_path_factory):
    """Starts every end-to-end run at once (each pays for importing torch), then collects them."""
    root = tmp_path_factory.mktemp("e2e")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(root), "SFT_CACHE": str(root / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = {}
    for case, (build, _) in E2E.items():
        folder = root / case
        folder.mkdir()
        dataset = build(folder)
        script = folder / "exp.py"
        script.write_text(f"from sft.train import main\nEXPERIMENT = 'fuzz'\nMODEL = {str(tiny_model_dir)!r}\n"
                          f"DATASET = {dataset!r}\nEVAL_ROWS = 2\nMAX_LENGTH = 128\nPRECISION = 'fp32'\n"
                          f"SAVE_MODEL = False\nRUNS_ROOT = {str(folder / 'runs')!r}\nmain(globals())\n")
        started[case] = (dataset, folder, subprocess.Popen([sys.executable, str(script)], cwd=folder, env=env,
                                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for case, (dataset, folder, proc) in started.items():
        try:
            _, stderr = proc.communicate(timeout=300)
        finally:
            proc.kill()
        results[case] = (dataset, folder, proc.returncode, stderr)
    return results


@pytest.mark.parametrize("case", list(E2E))
def test_experiment_script_prints_one_error_line_and_exits_2(e2e_runs, case):
    dataset, folder, returncode, stderr = e2e_runs[case]
    assert "Traceback" not in stderr, stderr
    assert returncode == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert re.fullmatch(E2E[case][1].replace("{path}", re.escape(dataset)) + ".*", line), line
    assert not (folder / "runs").exists()


# Seeded random conversations with reasoning and tool use, straight through sft.formats.

# Each pool is (good values, bad values); `pick` takes a bad one now and then.
THINK = (["", "", "<think>r</think>", "<think>\n\n</think>\n"],
         [" <think>r", "<think>r</think><think>s</think>", "</think>"])
CALL_NAMES = (["weather"], ["", " ", None, 3])
ARGUMENTS = ([{"city": "Paris"}, '{"city": "Paris"}', "{}", {}],
             ["", "{city", "[1]", "null", None, ["x"], 7, "9" * 5000, "[" * 5000 + "]" * 5000])
FIELD_VALUES = ["r", "", " ", None, 0, ["r"], {"r": 1}]


def pick(rng: random.Random, good_and_bad: tuple[list, list]):
    return rng.choice(good_and_bad[rng.random() < 0.01])


def random_call(rng: random.Random):
    if rng.random() < 0.005:
        return rng.choice(VALUES)
    function = {"name": pick(rng, CALL_NAMES), "arguments": pick(rng, ARGUMENTS)}
    if rng.random() < 0.005:
        del function[rng.choice(list(function))]
    if rng.random() < 0.4:
        return function  # the flat form
    call = {"type": pick(rng, (["function", None], ["retrieval"])), "function": function}
    if rng.random() < 0.5:
        call["id"] = pick(rng, (["call_1", "", None], [1]))
    return call


def random_turns(rng: random.Random) -> list[dict]:
    """A plausible agent conversation (a user turn, then calls and results, then a reply, repeated)."""
    turns = [{"role": "system", "content": "Use the tools."}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        turns.append({"role": "user", "content": "Weather?"})
        for _ in range(rng.randint(0, 2)):
            calls = [random_call(rng) for _ in range(rng.randint(1, 3))]
            turns.append({"role": "assistant", "content": rng.choice([None, "", "Checking."]), "tool_calls": calls})
            turns += [{"role": "tool", "content": "clear", "tool_call_id": "call_1"} for _ in calls]
        turns.append({"role": "assistant", "content": pick(rng, THINK) + "Clear."})
    return turns


def mutate_turns(rng: random.Random, turns: list[dict]) -> list:
    """0 to 3 edits: a key set to a random value, a key deleted, a turn deleted or duplicated."""
    for _ in range(rng.randint(0, 3)):
        i = rng.randrange(len(turns))
        kind = rng.choice(["set", "set", "delete_key", "delete", "duplicate"])
        if kind == "set":
            key = rng.choice(["role", "content", "reasoning_content", "reasoning", "thinking", "tool_calls", "name",
                              "tool_call_id", "weight"])
            pool = {"role": ["user", "assistant", "tool", "system", "bot"], "tool_calls": [[random_call(rng)], [], "x"],
                    "content": THINK[0] + THINK[1] + [None, 7, ["a"]]}.get(key, FIELD_VALUES)
            turns[i] = {**turns[i], key: rng.choice(pool)}
        elif kind == "delete_key" and turns[i]:
            key = rng.choice(list(turns[i]))
            turns[i] = {k: v for k, v in turns[i].items() if k != key}
        elif kind == "delete" and len(turns) > 1:
            del turns[i]
        else:
            turns.insert(i, turns[i])
    return turns


SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}


def as_sharegpt(rng: random.Random, turns: list[dict]) -> dict:
    """The same conversation in LLaMA-Factory's sharegpt layout, with a system column and tools as JSON text."""
    out = []
    for t in turns:
        source = SHAREGPT_FROM.get(t.get("role"), "bot")
        if t.get("content") or source != "gpt" or not t.get("tool_calls"):
            carried = {k: t[k] for k in ("reasoning", "thinking", "weight") if k in t}
            out.append({"from": source, "value": t.get("content"), **carried})
        if source == "gpt" and t.get("tool_calls"):
            value = t["tool_calls"] if rng.random() < 0.8 else t["tool_calls"][:1]
            out.append({"from": "function_call", "value": json.dumps([c.get("function", c) if isinstance(c, dict)
                                                                       else c for c in value])})
    return {"conversations": out, "system": rng.choice([None, "", "Be brief.", 3]),
            "tools": rng.choice([None, "[]", json.dumps([{"name": "weather", "parameters": {}}]), "[{", "{}"])}


def check_normalized(conversation: formats.Conversation) -> None:
    """The normalized form: only known keys, each optional one present only with a value, and stable under a
    second validation."""
    messages, tools, ignored = conversation
    assert list(ignored) == sorted(set(ignored)) and all(isinstance(k, str) for k in ignored)
    keys = {"system": {"content"}, "user": {"content"}, "tool": {"content", "name", "tool_call_id"},
            "assistant": {"content", "reasoning_content", "tool_calls"}}
    for m in messages:
        assert set(m) - {"role"} <= keys[m["role"]], m
        assert isinstance(m["content"], str) and all(isinstance(m[k], str) and m[k].strip()
                                                     for k in ("reasoning_content", "name", "tool_call_id") if k in m)
        assert m["content"].strip() or (m["role"] == "assistant" and m["content"] == "" and len(m) > 2), m
        for call in m.get("tool_calls", ()):
            assert call["type"] == "function" and set(call) <= {"type", "function", "id"}
            assert set(call["function"]) == {"name", "arguments"} and isinstance(call["function"]["arguments"], dict)
        assert m.get("tool_calls", True), m
    assert tools is None or (tools and all(t["type"] == "function" and t["function"]["name"] for t in tools))
    assert formats.validate_conversation(messages) == messages
    assert formats.content_chars(messages) >= 0 and json.loads(json.dumps(messages)) == messages


def test_random_reasoning_and_tool_use_normalizes_or_is_rejected():
    rng = random.Random(20250101)
    outcomes = Counter()
    for n in range(3000):
        turns = mutate_turns(rng, random_turns(rng))
        fmt, row = ("sharegpt", as_sharegpt(rng, turns)) if n % 3 == 2 else ("messages", {"messages": turns})
        if fmt == "messages" and rng.random() < 0.3:
            row["tools"] = rng.choice([[{"name": "weather"}], "[]", "[1]", {"name": "weather"}, "not JSON"])
        try:
            conversation = formats.row_to_conversation(row, fmt)
        except formats.MalformedRow as e:
            outcomes[e.reason] += 1
            continue
        except Exception as e:
            pytest.fail(f"case {n} raised {type(e).__name__}: {e}\n{json.dumps(row)[:2000]}")
        check_normalized(conversation)
        outcomes["normalized"] += 1
        outcomes["with tool calls"] += any("tool_calls" in m for m in conversation.messages)
        outcomes["with reasoning"] += any("reasoning_content" in m for m in conversation.messages)
        outcomes["with ignored keys"] += bool(conversation.ignored)
    # The observed split, written in the module docstring: pinned so that the two change together.
    assert outcomes == {"normalized": 823, "with tool calls": 689, "with reasoning": 368, "with ignored keys": 156,
                        "wrong_type": 444, "missing_field": 380, "bad_tool_call": 301, "turns_not_alternating": 251,
                        "bad_tools": 244, "unknown_role": 126, "call_without_result": 97, "system_not_first": 91,
                        "tool_without_call": 65, "not_starting_with_user": 65, "empty_content": 48,
                        "no_assistant_turn": 44, "reasoning_twice": 21}
