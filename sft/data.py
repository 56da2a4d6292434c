"""From a dataset source to tokenized train and held-out examples, with the statistics of every step.

rows (sft.sources: a local source's JSON texts, a hub dataset's Arrow table) -> conversations (sft.formats;
`read_source`) -> held-out split and shares, as row indices (sft.selection) -> token ids and labels
(sft.templates.encode_conversations) -> special-token text, length and supervision checks, into the store
(sft.store: `tokenize_to_store`, `TokenizedExamples`).

Reading and tokenization run in `num_proc` processes (two `Dataset.map`s), so the process that starts the
run never holds the rows as Python objects, into a store on disk (Arrow files, memory-mapped back) under a
key made of everything that determines its output (the source files' bytes or a hub
dataset's pinned revision, the settings that read and split them, the tokenizer files, the chat template
with the system prompt written into it, max_length, too_long, loss_on): a rerun with the same inputs opens
the store without reading the source; any change makes a new one.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import formats, sources
from .config import TrainConfig
from .demo_data import EMBEDDED_DATASETS
from .errors import ConfigError, DataError
from .modeling import cache_root
from .packing import Example
from .selection import Selection, shuffle_rows, split_heldout, take_share
from .sources import Source
from .store import (TokenizedExamples, auto_num_proc, cache_key, check_source_room, check_store_room,
                    example_lengths, map_fingerprint, map_progress, source_fingerprint, tokenize_to_store)

__all__ = ["DEFAULT_EVAL_FRACTION", "PreparedData", "ReadSource", "Selection", "TokenizedExamples",
           "example_lengths", "prepare_data", "read_source", "set_aside", "template_name", "tokenize_source",
           "tokenize_to_store"]

DEFAULT_EVAL_FRACTION = 0.05


@dataclass
class PreparedData:
    train: Sequence[Example]  # a memory-mapped TokenizedExamples when prepared here; a plain list works too
    eval: list[Example]
    eval_conversations: list[list[dict]]  # held-out conversations, for generation and the task metric
    stats: dict = field(default_factory=dict)
    cache_hit: bool = False
    source_names: list[str] = field(default_factory=list)  # the run's datasets (more than one: a mixture)
    eval_sources: list[int] = field(default_factory=list)  # each held-out example's dataset, by its index
    eval_tools: list = field(default_factory=list)  # each held-out conversation's tools (None for none)
    eval_rows: list = field(default_factory=list)  # each held-out conversation's (dataset, row number from 1)


@dataclass
class ReadSource:
    """A source's rows, read, checked and converted by `read_source`: each row's conversation as JSON text (null
    for a rejected row) in a memory-mapped Arrow table, with the counts."""
    texts: object  # a datasets.Dataset: columns conversation and tools (JSON texts) and chars (of the content)
    usable: np.ndarray  # the rows that are conversations, by index (a row's number is its index + 1)
    read: dict  # source, format, rows_read, rows_kept, rows_rejected, fields_ignored


def read_source(src: Source, num_proc: int | str, work: Path) -> ReadSource:
    """Detects the source's format from its first rows, then parses, checks and converts every row in
    `num_proc` processes (`Dataset.map`): a local or embedded source's rows as JSON texts (a JSON-lines file's
    lines unparsed), written to an Arrow file first; a hub dataset's rows from its own Arrow table. The first
    bad row in the source's order is the error, named by file and line."""
    from datasets import Features, Value

    source = src.dataset
    work.parent.mkdir(parents=True, exist_ok=True)
    rows_file = work.with_name(f"{work.name}-rows.arrow")
    if source.startswith("embedded:") or sources.local_path(source) is not None:
        rows, fmt, files = _write_rows(src, rows_file)
        read_batch, kwargs = _read_batch, dict(files=files)
    else:
        rows = sources.hub_dataset(source, revision=src.revision, split=src.split, max_rows=src.max_rows,
                                   data_files=src.files)
        fmt = _format(src, sorted(rows.column_names))
        rows = rows.with_format("arrow")  # the worker converts each batch, and names a value it cannot
        read_batch, kwargs = _read_hub_batch, dict(source=source, revision=src.revision, split=src.split)
    count = len(rows)
    procs = auto_num_proc(num_proc, count)
    features = Features({"conversation": Value("large_string"), "tools": Value("large_string"),
                         "chars": Value("int64"), "reject": Value("string"), "error": Value("string"),
                         "ignored": Value("string")})
    with map_progress(count, procs):
        texts = rows.map(
            read_batch, batched=True, batch_size=1024, num_proc=procs if procs > 1 else None,
            remove_columns=rows.column_names, features=features, keep_in_memory=False,
            cache_file_name=str(work.with_name(f"{work.name}.arrow")), new_fingerprint=map_fingerprint(work),
            desc=f"reading {src.name}", fn_kwargs=dict(fmt=fmt, **kwargs))
    rows_file.unlink(missing_ok=True)
    return _counted(texts.with_format(None), source, fmt, count)


def _write_rows(src: Source, rows_file: Path) -> tuple:
    """A local or embedded source's rows as JSON texts in the Arrow file `rows_file`, after its format is
    detected from the first of them: (the rows as a Dataset, the format, the source's files by index)."""
    from datasets import Dataset

    source = src.dataset
    if source in EMBEDDED_DATASETS:
        texts = ((sources.dumps_row(r), source, n, False)
                 for n, r in enumerate(EMBEDDED_DATASETS[source](src.max_rows), 1))
    elif source.startswith("embedded:"):
        raise DataError(f"dataset: unknown embedded dataset {source!r}; the embedded ones are "
                        f"{', '.join(EMBEDDED_DATASETS)}")
    else:
        texts = sources.row_texts(source, max_rows=src.max_rows)
    first = list(itertools.islice(texts, 100))
    fmt = _format(src, sorted({k for row in (sources.parse_row(*t) for t in first) for k in row}))
    files = {}
    schema = pa.schema([("text", pa.large_string()), ("file", pa.int32()), ("number", pa.int64()),
                        ("raw", pa.bool_())])
    with pa.OSFile(str(rows_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        rest = itertools.chain(first, texts)
        while chunk := list(itertools.islice(rest, 8192)):
            text, file, number, raw = zip(*chunk)
            writer.write_batch(pa.record_batch([pa.array(text, pa.large_string()),
                                                pa.array([files.setdefault(f, len(files)) for f in file], pa.int32()),
                                                pa.array(number, pa.int64()), pa.array(raw, pa.bool_())],
                                               schema=schema))
    return Dataset.from_file(str(rows_file)), fmt, list(files)


def _format(src: Source, columns: list[str]) -> str:
    """The source's format: its own, or the one its columns show."""
    try:
        fmt = formats.detect_format(columns) if src.format == "auto" else src.format
    except DataError as e:
        raise DataError(f"dataset {src.dataset}: {e}") from None
    if src.format != "auto" and not set(formats.FORMATS[fmt]) <= set(columns):
        raise DataError(f"dataset {src.dataset}: format {fmt!r} needs the columns {list(formats.FORMATS[fmt])}, "
                        f"found {columns}")
    return fmt


def _counted(texts, source: str, fmt: str, count: int) -> ReadSource:
    """The read rows with their counts; the first unreadable row's error, or none usable, is an error."""
    errors = texts.data.table.column("error")
    if errors.null_count < len(errors):
        raise DataError(errors[pc.index(pc.is_valid(errors), True).as_py()].as_py())
    reject = texts.data.table.column("reject")
    usable = np.flatnonzero(pc.is_null(reject).to_numpy(zero_copy_only=False))
    rejected = {r["values"]: r["counts"] for r in pc.value_counts(reject.drop_null()).to_pylist()}
    if not usable.size:
        raise DataError(f"dataset {source}: none of its {count} rows is a usable {fmt} conversation "
                        f"(rejected by reason: {rejected})")
    ignored = Counter(k for keys in texts.data.table.column("ignored").drop_null().to_pylist() for k in keys.split(","))
    return ReadSource(texts.remove_columns(["reject", "error", "ignored"]), usable,
                      {"source": source, "format": fmt, "rows_read": count, "rows_kept": int(usable.size),
                       "rows_rejected": rejected, "fields_ignored": dict(sorted(ignored.items()))})


def _read_batch(batch: dict, fmt: str, files: list[str]) -> dict:
    """Dataset.map's function over a local source's row texts: each parsed, checked and converted."""
    rows = []
    for text, file, number, raw in zip(batch["text"], batch["file"], batch["number"], batch["raw"]):
        try:
            rows.append(sources.parse_row(text, files[file], number, raw))
        except DataError as e:
            rows.append(e)
    return _conversations(rows, fmt)


def _read_hub_batch(batch: pa.Table, fmt: str, source: str, revision: str, split: str) -> dict:
    """Dataset.map's function over a batch of a hub dataset's Arrow table: each row checked and converted."""
    return _conversations(sources.hub_rows(batch, source, revision, split), fmt)


def _conversations(rows: list[dict | DataError], fmt: str) -> dict:
    """Each row as a conversation; a rejected row gets its reason, an unreadable one (a DataError) its error."""
    out = {"conversation": [], "tools": [], "chars": [], "reject": [], "error": [], "ignored": []}
    for row in rows:
        conversation, tools, chars, reject, error, ignored = None, None, 0, None, None, None
        try:
            if isinstance(row, DataError):
                raise row
            got = formats.row_to_conversation(row, fmt)
            conversation = json.dumps(got.messages, ensure_ascii=False)
            tools = json.dumps(got.tools, ensure_ascii=False) if got.tools else None
            chars = formats.content_chars(got.messages)
            ignored = ",".join(got.ignored) or None
        except formats.MalformedRow as e:
            reject = e.reason
        except DataError as e:
            error = str(e)
        for key, value in zip(out, (conversation, tools, chars, reject, error, ignored)):
            out[key].append(value)
    return out


def prepare_data(cfg: TrainConfig, tokenizer) -> PreparedData:
    """The tokenized train and held-out examples, from the store in the cache when one was made from the same
    source files and settings (`sft.store.cache_key`): then nothing is read or parsed but the store itself."""
    root = cache_root()
    fingerprints = [source_fingerprint(s.dataset, s.revision, s.files, root / "file_digests") for s in cfg.sources()]
    key = cache_key(tokenizer, cfg, fingerprints, cfg.eval_dataset and source_fingerprint(
        cfg.eval_dataset, cfg.eval_dataset_revision, cfg.eval_dataset_files, root / "file_digests"))
    store = root / "tokenized" / key
    hit = (store / "stats.json").exists()
    if not hit:
        work = store.with_name(f".{key}.{os.getpid()}.tmp")
        shutil.rmtree(work, ignore_errors=True)
        try:
            (work / "stats.json").parent.mkdir(parents=True)
            stats = tokenize_source(cfg, tokenizer, work)
            (work / "stats.json").write_text(json.dumps(stats))
            shutil.rmtree(store, ignore_errors=True)
            os.replace(work, store)  # complete stores only: a crash or an error leaves no half-written one
        finally:
            shutil.rmtree(work, ignore_errors=True)
    stats = json.loads((store / "stats.json").read_text())
    if not stats["train"]["examples"]:
        raise DataError(f"dataset {cfg.dataset}: no training example is left after the checks "
                        f"({stats['train']['dropped']})")
    if not stats["eval"]["examples"]:
        raise DataError(f"dataset {cfg.eval_dataset or cfg.dataset}: no held-out example is left after the "
                        f"checks ({stats['eval']['dropped']}); the held-out loss would be undefined")
    kept_eval = json.loads((store / "eval_conversations.json").read_text())
    stats["tokenization_cache"] = {"key": key, "hit": hit}
    held_out = TokenizedExamples(store / "eval")
    return PreparedData(TokenizedExamples(store / "train"), held_out.to_list(), kept_eval["messages"], stats, hit,
                        [s["name"] for s in stats["sources"]], held_out.sources.tolist(), kept_eval["tools"],
                        [tuple(r) for r in kept_eval["rows"]])


def tokenize_source(cfg: TrainConfig, tokenizer, work: Path) -> dict:
    """Reads each source, splits off its held-out rows, takes its share of the rest, and tokenizes all sources'
    train and held-out conversations into the store at `work`, with the held-out conversations (for
    generation) and the statistics of every step, in all and per source; returns the statistics."""
    srcs = cfg.sources()
    check_source_room(work.parent, [s.dataset for s in srcs] + [cfg.eval_dataset] * (cfg.eval_dataset is not None))
    train, held_out, reads = _select(cfg, srcs, work)
    check_store_room(work.parent, train.chars() + held_out.chars())
    eval_names = [cfg.eval_dataset] if cfg.eval_dataset is not None else [s.name for s in srcs]
    named = template_name(cfg)
    tok_stats = {"train": tokenize_to_store(train, tokenizer, cfg, "train", [s.name for s in srcs], work / "train",
                                            named),
                 "eval": tokenize_to_store(held_out, tokenizer, cfg, "held-out", eval_names, work / "eval", named)}
    kept = np.flatnonzero(tok_stats["eval"].pop("kept_mask"))
    kept_eval = {"messages": [held_out.conversation(i) for i in kept], "tools": [held_out.tools(i) for i in kept],
                 "rows": [(eval_names[min(int(held_out.source[i]), len(eval_names) - 1)], held_out.row(i))
                          for i in kept]}
    tok_stats["train"].pop("kept_mask")
    (work / "eval_conversations.json").write_text(json.dumps(kept_eval, ensure_ascii=False))
    counts = {"train_conversations": len(train), "eval_conversations": len(held_out)}
    del train, held_out
    shutil.rmtree(work / "read")  # the conversations are in the store now
    by_source = {split: tok_stats[split].pop("by_source") for split in tok_stats}
    for k, read in enumerate(reads):
        read["train"], read["eval"] = by_source["train"][k], by_source["eval"][min(k, len(eval_names) - 1)]
    one = len(reads) == 1
    single = {k: v for k, v in reads[0].items() if k not in ("name", "share", "train", "eval")} if one else {
        "rows_read": sum(r["rows_read"] for r in reads), "rows_kept": sum(r["rows_kept"] for r in reads),
        "rows_rejected": dict(sum((Counter(r["rows_rejected"]) for r in reads), Counter())),
        **counts}
    return {**single, **tok_stats, "sources": reads}


def _select(cfg: TrainConfig, srcs: list[Source], work: Path) -> tuple[Selection, Selection, list[dict]]:
    """Each source read, its held-out rows split off and its share of the rest taken: the train and held-out
    selections, with each source's reading statistics."""
    tables, train, held_out, reads = [], [], [], []  # the read sources; (table, index, source) per example
    for k, src in enumerate(srcs):
        got = read_source(src, cfg.num_proc, work / "read" / str(k))
        tables.append(got.texts)
        read = got.read
        train_rows, eval_table, eval_rows = _held_out(cfg, k, src, got, tables, work)
        try:
            train_rows = take_share(train_rows, src.share, seed=cfg.seed + k)
        except ConfigError as e:
            raise ConfigError(f"datasets: {src.name}: {e}") from None
        reads.append(dict(name=src.name, **read, share=src.share, train_conversations=len(train_rows),
                          eval_conversations=len(eval_rows)))
        train.append((k, np.asarray(train_rows, dtype=np.int64)))
        held_out.append([(eval_table, i, k) for i in eval_rows])
    of_source = np.concatenate([np.full(len(rows), k) for k, rows in train])  # source k's rows are in table k
    train = Selection(tables, of_source, np.concatenate([rows for _, rows in train]), of_source)
    # held-out conversations taken from each source in turn: the samples and the task metric, which read the
    # first of them, see every source
    turns = [x for turn in itertools.zip_longest(*held_out) for x in turn if x is not None]
    return train, Selection(tables, *(np.array(column, dtype=np.int64) for column in zip(*turns))), reads


def _held_out(cfg: TrainConfig, k: int, src: Source, got: ReadSource, tables: list, work: Path) -> tuple:
    """(train rows, the table of the held-out rows, held-out rows) of source k: its own rows split, or all of
    them for training and the first rows of `eval_dataset` held out (read into `tables`)."""
    read, usable = got.read, got.usable.tolist()
    if cfg.eval_dataset is not None:  # one source (checked in the config), held out from another dataset
        train_rows = shuffle_rows(usable, cfg.seed)
        same_repo = cfg.eval_dataset == cfg.dataset
        other = read_source(Source(
            cfg.eval_dataset, None, cfg.dataset_format,
            cfg.eval_dataset_revision or (cfg.dataset_revision if same_repo else None), cfg.eval_dataset_files,
            cfg.eval_dataset_split, cfg.eval_rows, cfg.eval_dataset), cfg.num_proc, work / "read" / "eval")
        tables.append(other.texts)
        read["eval_source"] = other.read
        return train_rows, len(tables) - 1, other.usable.tolist()
    eval_rows = cfg.eval_rows if cfg.eval_rows is not None else DEFAULT_EVAL_FRACTION
    try:
        train_rows, eval_rows = split_heldout(usable, eval_rows=eval_rows, seed=cfg.seed)
    except ConfigError as e:
        raise ConfigError(f"{e} ({read['rows_kept']} of {read['rows_read']} rows of {src.dataset} "
                          f"are usable; rejected by reason: {read['rows_rejected']})") from None
    return train_rows, k, eval_rows


def template_name(cfg: TrainConfig) -> str:
    """The chat template as an error names it."""
    if cfg.template == "plain":
        return "the plain template"
    if cfg.template in ("auto", "tokenizer"):
        return f"the chat template of {cfg.model}"
    return f"the chat template {cfg.template}"



def set_aside(stats: dict) -> list[str]:
    """One line per step that set data aside (rejected rows, dropped or truncated examples), for the
    console: counted in data_stats.json either way, but a run should not lose rows unannounced."""
    lines = []
    for read in [r for source in stats["sources"] for r in (source, source.get("eval_source"))]:
        if read and read["rows_rejected"]:
            lines.append(f"dataset {read['source']}: {sum(read['rows_rejected'].values())} of {read['rows_read']} "
                         f"rows are not usable {read['format']} conversations and were left out "
                         f"({read['rows_rejected']})")
        if read and read.get("fields_ignored"):
            lines.append(f"dataset {read['source']}: message fields that no chat template reads were left out "
                         f"(rows with each: {read['fields_ignored']})")
    for split in ("train", "eval"):
        if stats[split]["dropped"]:
            lines.append(f"{split}: {sum(stats[split]['dropped'].values())} examples dropped "
                         f"({stats[split]['dropped']})")
        if stats[split]["truncated"]:
            lines.append(f"{split}: {stats[split]['truncated']} examples truncated to max_length")
    return lines


