"""The tokenized store: the selected conversations encoded in `num_proc` processes (`Dataset.map`) into Arrow
files on disk, memory-mapped back as `TokenizedExamples`, under a key made of everything that determines them
(`cache_key`, with `source_fingerprint`), after a check that the disk has room (`check_source_room`,
`check_store_room`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .config import EMBEDDED_DATASET, TrainConfig
from .demo_data import EMBEDDED_DATASETS
from .errors import ConfigError, DataError
from .packing import Example, shift_labels
from .selection import Selection
from .templates import IGNORE_INDEX, encode_conversations

CACHE_VERSION = 7
MAX_AUTO_PROC = 32
MIN_ROWS_PER_PROC = 2000
TOKENIZE_BATCH = 256  # conversations per tokenizer call
DROPPED = ("special_token_text", "too_long", "no_supervised_tokens_after_truncation")


def cache_key(tokenizer, cfg: TrainConfig, *sources) -> str:
    """Everything that determines the store: the sources' fingerprints, the settings that read, split and
    tokenize them, and the tokenizer with its chat template (which holds the system prompt)."""
    h = hashlib.sha256()
    reading = {k: getattr(cfg, k) for k in ("dataset", "datasets", "dataset_revision", "dataset_format",
                                             "dataset_split",
                                             "dataset_files", "max_rows", "eval_dataset", "eval_dataset_split",
                                             "eval_dataset_revision", "eval_dataset_files", "eval_rows", "seed")}
    h.update(json.dumps([CACHE_VERSION, cfg.max_length, cfg.too_long, cfg.loss_on, cfg.multi_turn,
                         tokenizer.chat_template,
                         tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token, tokenizer.bos_token,
                         reading, sources], sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:24]


def source_fingerprint(source: str, revision: str | None, files: str | None, digests: Path) -> str:
    """What identifies a source's rows without reading them as rows: the bytes of a local file or folder
    (hashed, each file's digest remembered under `digests`), the embedded set's code, or a hub dataset's id at
    its pinned revision (and the files chosen)."""
    if source.startswith("embedded:"):
        code = Path(EMBEDDED_DATASETS[EMBEDDED_DATASET].__code__.co_filename).read_bytes()
        return f"{source}:{hashlib.sha256(code).hexdigest()}"
    path = Path(source).expanduser()
    if not path.exists():
        return f"hub:{source}@{revision}:{files}"
    h = hashlib.sha256()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{file_digest(f, digests)}\0".encode())
    return h.hexdigest()


def file_digest(path: Path, digests: Path) -> str:
    """The sha256 of a file's bytes, remembered in the folder `digests` by the file's path, size, modification
    time and inode (as git's index remembers what it hashed): an unchanged file is not read again, so a cache
    hit on a million-row file costs a stat, not a second of hashing."""
    st = path.stat()
    seen = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    memo = digests / hashlib.sha256(seen.encode()).hexdigest()[:40]
    if memo.is_file():
        return memo.read_text()
    h = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 24):
            h.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(h.hexdigest())
    os.replace(tmp, memo)
    return h.hexdigest()


def check_source_room(root: Path, datasets: list[str]) -> None:
    """Before anything is read: reading a local source writes its rows and then its conversations as text, about
    twice its size, and its tokens take about as much again; room for 3 times the source's bytes."""
    need = 0
    for dataset in datasets:
        path = Path(dataset).expanduser()
        if path.exists():
            need += 3 * sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    _check_room(root, need)


def check_store_room(root: Path, chars: int) -> None:
    """A tokenized store takes about 4 bytes per token, and a token takes at least 2 characters of the
    rendered text in every tokenizer worth training: room for 3 bytes per character of content, checked
    before tokenizing."""
    _check_room(root, 3 * chars)


def _check_room(root: Path, need: int) -> None:
    from .run_folder import require_room

    root.mkdir(parents=True, exist_ok=True)
    require_room(root, need, lambda free: ConfigError(
        f"dataset: the tokenized store needs about {need / 2**30:.2f} GiB in {root} and {free / 2**30:.2f} GiB "
        f"are free; free some space or point SFT_CACHE elsewhere"))


def auto_num_proc(num_proc: int | str, conversations: int) -> int:
    """`num_proc="auto"`: the cores this process may use, at most MAX_AUTO_PROC, and one process for sets too
    small to pay for starting more."""
    if num_proc != "auto":
        return num_proc
    if conversations < MIN_ROWS_PER_PROC * 2:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_AUTO_PROC, conversations // MIN_ROWS_PER_PROC))


@contextlib.contextmanager
def map_progress(rows: int, procs: int):
    """`Dataset.map`'s own progress bar, for sets that take more than a moment (small ones would only add lines);
    forked tokenizer processes each tokenize on their own."""
    from datasets import disable_progress_bars, enable_progress_bars

    if procs > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    (enable_progress_bars if rows >= MIN_ROWS_PER_PROC else disable_progress_bars)()
    try:
        yield
    finally:
        disable_progress_bars()  # saving and loading the store are quick


def map_fingerprint(path: Path) -> str:
    """`Dataset.map`'s name for its output, given rather than computed (which would hash every argument)."""
    return hashlib.sha256(f"{path.resolve()}\0{os.getpid()}".encode()).hexdigest()[:16]


def tokenize_to_store(selection: Selection, tokenizer, cfg: TrainConfig, split: str, source_names: list[str],
                      path: Path, template_name: str = "the chat template") -> dict:
    """Encodes the selected conversations (`Dataset.map`, batched, in `num_proc` processes, which read them from
    the memory-mapped tables) into an Arrow dataset at `path`: int32 token ids, a one-bit supervision mask, the
    length and the source of each example (a conversation is one example, or one per assistant turn where the
    template rewrites earlier turns: `multi_turn`), for the examples that pass the length and supervision
    rules; the others are counted. An error names the source, the number of the row the conversation came
    from and the template. Returns the split's statistics, in all and per source (`by_source`), and which
    conversations were kept whole (`kept_mask`)."""
    from datasets import Dataset

    encoded = _encode(selection, tokenizer, cfg, split, path)
    status = encoded.data.column("status").to_pylist()
    position = encoded.data.column("position").to_numpy()
    for k, reason in enumerate(status):
        if reason in ("no_supervised_tokens", "all_supervised", "too_long_error") or reason.startswith("error:"):
            i = int(position[k])
            raise DataError(_row_error(reason, f"dataset {source_names[selection.source[i]]}: {split}",
                                       selection.row(i), selection.conversation(i), encoded[k]["tokens"], cfg,
                                       template_name))
    kept = np.array([r not in DROPPED for r in status], dtype=bool)
    store = encoded.remove_columns(["status", "tokens", "supervised_tokens", "position", "roles"])
    store = store.select(np.flatnonzero(kept)) if kept.any() else Dataset.from_dict(
        {k: [] for k in store.features}, features=store.features)
    store.save_to_disk(str(path))
    for f in path.parent.glob(f"{path.name}-map*.arrow"):
        f.unlink()
    return _split_stats(encoded, np.array(status), position, kept, len(selection), len(source_names), cfg)


def _encode(selection: Selection, tokenizer, cfg: TrainConfig, split: str, path: Path):
    """The `Dataset.map` of `_encode_batch` over the selection, one row per example, next to `path`."""
    from datasets import Dataset, Features, List, Value

    features = Features({"input_ids": List(Value("int32")), "supervised": List(Value("bool")),
                         "length": Value("int32"), "source": Value("int16"), "position": Value("int64"),
                         "status": Value("string"), "tokens": Value("int32"), "supervised_tokens": Value("int32"),
                         "roles": Value("string")})
    table = Dataset.from_dict({"table": selection.table.astype(np.int16), "index": selection.index,
                               "source": selection.source.astype(np.int16),
                               "position": np.arange(len(selection), dtype=np.int64)})
    procs = auto_num_proc(cfg.num_proc, len(selection))
    with map_progress(len(selection), procs):
        return table.map(_encode_batch, batched=True, batch_size=TOKENIZE_BATCH,
                         num_proc=procs if procs > 1 else None,
                         remove_columns=["table", "index", "source", "position"],
                         features=features, keep_in_memory=False, new_fingerprint=map_fingerprint(path),
                         cache_file_name=str(path.parent / f"{path.name}-map.arrow"), desc=f"tokenizing ({split})",
                         fn_kwargs=dict(tables=selection.tables, tokenizer=tokenizer, loss_on=cfg.loss_on,
                                        max_length=cfg.max_length, too_long=cfg.too_long,
                                        multi_turn=cfg.multi_turn))


def _split_stats(encoded, reasons: np.ndarray, position: np.ndarray, kept: np.ndarray, conversations: int,
                 sources: int, cfg: TrainConfig) -> dict:
    """A split's statistics from its encoded rows: in all, per source (`by_source`), and which conversations were
    kept whole (`kept_mask`)."""
    columns = {name: encoded.data.column(name).to_numpy() for name in ("length", "supervised_tokens", "source")}

    def counts(mine: np.ndarray) -> dict:
        lengths = columns["length"][mine & kept]
        dropped = {r: int(((reasons == r) & mine).sum()) for r in DROPPED}
        return {"examples": int(len(lengths)), "dropped": {r: n for r, n in dropped.items() if n},
                "truncated": int(((reasons == "truncated") & mine).sum()), "tokens": int(lengths.sum()),
                "supervised_tokens": int(columns["supervised_tokens"][mine & kept].sum())}

    everything = counts(np.ones(len(reasons), dtype=bool))
    if everything["tokens"]:
        lengths = columns["length"][kept]
        everything.update(
            supervised_fraction=round(everything["supervised_tokens"] / everything["tokens"], 4),
            length_percentiles={f"p{q}": int(np.percentile(lengths, q)) for q in (0, 10, 50, 90, 99, 100)})
    whole = np.ones(conversations, dtype=bool)
    whole[position[~kept]] = False  # a conversation one of whose examples was dropped
    per_conversation = np.bincount(position, minlength=conversations)
    roles = Counter()
    for text in encoded.data.column("roles").to_pylist():
        roles.update(json.loads(text))
    everything["multi_turn"] = {"mode": cfg.multi_turn, "conversations": conversations,
                                "examples_per_conversation": {str(n): int(c) for n, c in enumerate(
                                    np.bincount(per_conversation)) if c and n}, "turns_by_role": dict(roles)}
    return {**everything, "by_source": [counts(columns["source"] == k) for k in range(sources)],
            "kept_mask": whole.tolist()}
def _encode_batch(batch: dict, tables: list, tokenizer, loss_on: str, max_length: int, too_long: str,
                  multi_turn: str) -> dict:
    """Dataset.map's function: the examples of each selected conversation, with their token ids, supervision
    mask, length, status and count of supervised tokens (the mask shifted by one: an example's first token is
    never predicted); a conversation the template or the checks refuse is one row whose status is the error.
    The conversation's turns by role ride on its first row, for the statistics."""
    special = special_token_pattern(tokenizer)
    columns = [(t.data.table.column("conversation"), t.data.table.column("tools")) for t in tables]
    # element by element: Arrow's take on a column of many chunks would first join them, a copy of all the text
    conversations, tools = [], []
    for t, i in zip(batch["table"], batch["index"]):
        conversations.append(json.loads(columns[t][0][i].as_py()))
        text = columns[t][1][i].as_py()
        tools.append(json.loads(text) if text else None)
    clean = [special is None or not any(special.search(x) for x in message_texts(c)) for c in conversations]
    encoded = iter(encode_conversations(tokenizer, [c for c, ok in zip(conversations, clean) if ok],
                                        [t for t, ok in zip(tools, clean) if ok], loss_on=loss_on,
                                        multi_turn=multi_turn))
    out = {k: [] for k in ("input_ids", "supervised", "length", "source", "position", "status", "tokens",
                           "supervised_tokens", "roles")}
    for conversation, ok, source, position in zip(conversations, clean, batch["source"], batch["position"]):
        examples = next(encoded) if ok else [None]
        if isinstance(examples, Exception):
            examples = [f"error: {examples}"]
        roles = json.dumps(Counter(m["role"] for m in conversation))
        for example in examples:
            row = _example_row(example, loss_on, max_length, too_long)
            for key, value in zip(("input_ids", "supervised", "length", "status", "tokens", "supervised_tokens"), row):
                out[key].append(value)
            out["source"].append(source)
            out["position"].append(position)
            out["roles"].append(roles)
            roles = "{}"
    return out


def _example_row(example, loss_on: str, max_length: int, too_long: str) -> tuple:
    """(ids, mask, length, status, tokens, supervised tokens) of one example: an `Encoded`, None for a
    conversation holding special-token text, or an error's text."""
    if example is None or isinstance(example, str):
        return [], [], 0, example or "special_token_text", 0, 0
    ids = example.input_ids
    mask = [label != IGNORE_INDEX for label in example.labels]
    status, n = "ok", len(ids)
    if not any(mask):
        status = "no_supervised_tokens"
    elif loss_on == "assistant" and all(mask):
        status = "all_supervised"
    elif n > max_length:
        status = {"error": "too_long_error", "drop": "too_long"}.get(too_long, "truncated")
        if status == "truncated":
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask[1:]):  # targets are the labels shifted by one: the first one is never a target
                status = "no_supervised_tokens_after_truncation"
    if status not in ("ok", "truncated"):
        return [], [], 0, status, n, 0
    return ids, mask, len(ids), status, n, sum(mask[1:])


def _row_error(reason: str, split: str, row: int, conversation: list[dict], tokens: int, cfg: TrainConfig,
               template_name: str) -> str:
    if reason.startswith("error: "):
        return f"{split} row {row}, with {template_name}: {reason[len('error: '):]}: {_preview(conversation)}"
    if reason == "no_supervised_tokens":
        return f"{split} row {row} has no supervised tokens: {_preview(conversation)}"
    if reason == "all_supervised":
        return (f"{split} row {row}: every token is supervised although loss_on='assistant'; the chat template "
                f"marks no prompt: {_preview(conversation)}")
    return (f"{split} row {row} has {tokens} tokens, more than max_length={cfg.max_length}; raise max_length or "
            f"set too_long='truncate' or 'drop': {_preview(conversation)}")


class TokenizedExamples(Sequence):
    """The examples of a tokenized store, memory-mapped from its Arrow files: an `Example` is built from its
    row only when asked for, so the token ids of a million examples stay on disk, in the page cache, not
    in the process's own memory."""

    def __init__(self, path: Path):
        from datasets import Dataset

        self.path = Path(path)
        self.table = Dataset.load_from_disk(str(path))
        self.lengths = self.table.data.column("length").to_numpy()
        self.sources = self.table.data.column("source").to_numpy()  # each example's dataset, by its index

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        row = self.table[int(i)]
        return _example(row["input_ids"], row["supervised"])

    def to_list(self) -> list[Example]:
        """Every example, read column by column (a row at a time costs more than the conversion)."""
        data = self.table.data
        return [_example(ids, mask) for ids, mask in zip(data.column("input_ids").to_pylist(),
                                                          data.column("supervised").to_pylist())]


def _example(ids: list[int], supervised: list[bool]) -> Example:
    return shift_labels(ids, [t if s else IGNORE_INDEX for t, s in zip(ids, supervised)])


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """Matches the text of the tokenizer's special tokens. The tokenizer turns such text inside a message
    into the control token itself: an assistant reply holding "<|im_end|>" would teach the model to stop
    mid-reply, and a user turn holding "<|im_start|>assistant" would fake a turn."""
    texts = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content})
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def message_texts(messages: list[dict]) -> list[str]:
    """Every text of a conversation that the template writes out: contents, reasoning, tool names and
    arguments, tool result names."""
    out = []
    for m in messages:
        out += [m["content"], m.get("reasoning_content", ""), m.get("name", "")]
        out += [json.dumps(c, ensure_ascii=False) for c in m.get("tool_calls", ())]
    return [t for t in out if t]


def example_lengths(examples: Sequence[Example]) -> list[int]:
    """Token counts of the examples: read from the store's length column, not from the examples."""
    if isinstance(examples, TokenizedExamples):
        return examples.lengths.tolist()
    return [len(e.input_ids) for e in examples]


def _preview(conversation: list[dict], width: int = 80) -> str:
    text = json.dumps(conversation, ensure_ascii=False)
    return text if len(text) <= width else text[:width] + "..."


