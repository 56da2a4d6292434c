"""From a dataset source to tokenized train and held-out examples, with the statistics of every step.

rows as JSON text (sft.sources.row_texts) -> conversations (sft.formats; `read_source`) -> held-out split and
shares, as row indices (`Selection`) -> token ids and labels (sft.templates.encode_chats) -> special-token
text, length and supervision checks (`tokenize_to_store`) -> `Example`s (sft.packing; `TokenizedExamples`).

Reading and tokenization run in `num_proc` processes (two `Dataset.map`s), so the process that starts the
run never holds the rows as Python objects, into a store on disk (Arrow files, memory-mapped back) under a
key made of everything that determines its output (the source files' bytes or a hub
dataset's pinned revision, the settings that read and split them, the tokenizer files, the chat template
with the system prompt written into it, max_length, too_long, loss_on): a rerun with the same inputs opens
the store without reading the source; any change makes a new one.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import formats, sources
from .config import EMBEDDED_DATASET, Source, TrainConfig
from .demo_data import EMBEDDED_DATASETS
from .errors import ConfigError, DataError
from .modeling import cache_root
from .packing import Example, shift_labels
from .templates import IGNORE_INDEX, encode_conversations

CACHE_VERSION = 7
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
    """Reads a source's rows as JSON texts (a JSON-lines file's lines unparsed) into an Arrow file, detects the
    format from the first rows, then parses, checks and converts every row in `num_proc` processes
    (`Dataset.map`). The first bad row in the source's order is the error, named by file and line."""
    from datasets import Dataset, Features, Value

    source = src.dataset
    if source in EMBEDDED_DATASETS:
        texts = ((sources.dumps_row(r), source, n, False)
                 for n, r in enumerate(EMBEDDED_DATASETS[source](src.max_rows), 1))
    elif source.startswith("embedded:"):
        raise DataError(f"dataset: unknown embedded dataset {source!r}; the embedded ones are "
                        f"{', '.join(EMBEDDED_DATASETS)}")
    else:
        texts = sources.row_texts(source, revision=src.revision, split=src.split, max_rows=src.max_rows,
                                  data_files=src.files)
    first = list(itertools.islice(texts, 100))
    columns = sorted({k for row in (sources.parse_row(*t) for t in first) for k in row})
    try:
        fmt = formats.detect_format(columns) if src.format == "auto" else src.format
    except DataError as e:
        raise DataError(f"dataset {source}: {e}") from None
    if src.format != "auto" and not set(formats.FORMATS[fmt]) <= set(columns):
        raise DataError(f"dataset {source}: format {fmt!r} needs the columns {list(formats.FORMATS[fmt])}, "
                        f"found {columns}")
    work.parent.mkdir(parents=True, exist_ok=True)
    rows_file, files = work.with_name(f"{work.name}-rows.arrow"), {}
    schema = pa.schema([("text", pa.large_string()), ("file", pa.int32()), ("number", pa.int64()),
                        ("raw", pa.bool_())])
    count = 0
    with pa.OSFile(str(rows_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        rest = itertools.chain(first, texts)
        while chunk := list(itertools.islice(rest, 8192)):
            text, file, number, raw = zip(*chunk)
            writer.write_batch(pa.record_batch([pa.array(text, pa.large_string()),
                                                pa.array([files.setdefault(f, len(files)) for f in file], pa.int32()),
                                                pa.array(number, pa.int64()), pa.array(raw, pa.bool_())],
                                               schema=schema))
            count += len(chunk)
    procs = auto_num_proc(num_proc, count)
    features = Features({"conversation": Value("large_string"), "tools": Value("large_string"),
                         "chars": Value("int64"), "reject": Value("string"), "error": Value("string"),
                         "ignored": Value("string")})
    with _map_progress(count, procs):
        texts = Dataset.from_file(str(rows_file)).map(
            _read_batch, batched=True, batch_size=1024, num_proc=procs if procs > 1 else None,
            remove_columns=["text", "file", "number", "raw"], features=features, keep_in_memory=False,
            cache_file_name=str(work.with_name(f"{work.name}.arrow")), new_fingerprint=_fingerprint(work),
            desc=f"reading {src.name}", fn_kwargs=dict(fmt=fmt, files=list(files)))
    rows_file.unlink()
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
    """Dataset.map's function: each row text parsed, checked and converted; a rejected row gets its reason, an
    unreadable one its error."""
    out = {"conversation": [], "tools": [], "chars": [], "reject": [], "error": [], "ignored": []}
    for text, file, number, raw in zip(batch["text"], batch["file"], batch["number"], batch["raw"]):
        conversation, tools, chars, reject, error, ignored = None, None, 0, None, None, None
        try:
            got = formats.row_to_conversation(sources.parse_row(text, files[file], number, raw), fmt)
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


@dataclass
class Selection:
    """Conversations to tokenize, by reference: example i is row `index[i]` of `tables[table[i]]` (a `ReadSource`'s
    texts) and counts for dataset `source[i]`."""
    tables: list
    table: np.ndarray
    index: np.ndarray
    source: np.ndarray

    @classmethod
    def of(cls, conversations: list[list[dict]], tools: list | None = None) -> "Selection":
        """Conversations in memory, as one dataset."""
        from datasets import Dataset

        tools = tools or [None] * len(conversations)
        texts = Dataset.from_dict({"conversation": [json.dumps(c, ensure_ascii=False) for c in conversations],
                                   "tools": [json.dumps(t, ensure_ascii=False) if t else None for t in tools],
                                   "chars": [formats.content_chars(c) for c in conversations]})
        zeros = np.zeros(len(conversations), dtype=np.int64)
        return cls([texts], zeros, np.arange(len(conversations)), zeros)

    @classmethod
    def every_usable_row(cls, read: "ReadSource") -> "Selection":
        """All of one read source's conversations, in order."""
        zeros = np.zeros(len(read.usable), dtype=np.int64)
        return cls([read.texts], zeros, read.usable, zeros)

    def __len__(self) -> int:
        return len(self.index)

    def row(self, i: int) -> int:
        """The number of the row example i came from, counted from 1 in the order read."""
        return int(self.index[i]) + 1

    def conversation(self, i: int) -> list[dict]:
        return json.loads(self.tables[self.table[i]].data.table.column("conversation")[int(self.index[i])].as_py())

    def tools(self, i: int) -> list | None:
        text = self.tables[self.table[i]].data.table.column("tools")[int(self.index[i])].as_py()
        return json.loads(text) if text else None

    def chars(self) -> int:
        return int(sum(self.tables[t].data.table.column("chars").to_numpy()[self.index[self.table == t]].sum()
                       for t in range(len(self.tables))))


def prepare_data(cfg: TrainConfig, tokenizer) -> PreparedData:
    """The tokenized train and held-out examples, from the store in the cache when one was made from the same
    source files and settings (`_cache_key`): then nothing is read or parsed but the store itself."""
    fingerprints = [source_fingerprint(s.dataset, s.revision, s.files) for s in cfg.sources()]
    key = _cache_key(tokenizer, cfg, fingerprints, cfg.eval_dataset and source_fingerprint(
        cfg.eval_dataset, cfg.eval_dataset_revision, cfg.eval_dataset_files))
    store = cache_root() / "tokenized" / key
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
    tables, train, held_out, reads = [], [], [], []  # the read sources; (table, index, source) per example
    for k, src in enumerate(srcs):
        got = read_source(src, cfg.num_proc, work / "read" / str(k))
        tables.append(got.texts)
        read, usable = got.read, got.usable.tolist()
        if cfg.eval_dataset is not None:  # one source (checked in the config), held out from another dataset
            train_rows = sources.shuffle_rows(usable, cfg.seed)
            same_repo = cfg.eval_dataset == cfg.dataset
            other = read_source(Source(
                cfg.eval_dataset, None, cfg.dataset_format,
                cfg.eval_dataset_revision or (cfg.dataset_revision if same_repo else None), cfg.eval_dataset_files,
                cfg.eval_dataset_split, cfg.eval_rows, cfg.eval_dataset), cfg.num_proc, work / "read" / "eval")
            tables.append(other.texts)
            read["eval_source"], eval_table, eval_rows = other.read, len(tables) - 1, other.usable.tolist()
        else:
            eval_rows, eval_table = cfg.eval_rows if cfg.eval_rows is not None else DEFAULT_EVAL_FRACTION, k
            try:
                train_rows, eval_rows = sources.split_heldout(usable, eval_rows=eval_rows, seed=cfg.seed)
            except ConfigError as e:
                raise ConfigError(f"{e} ({read['rows_kept']} of {read['rows_read']} rows of {src.dataset} "
                                  f"are usable; rejected by reason: {read['rows_rejected']})") from None
        try:
            train_rows = sources.take_share(train_rows, src.share, seed=cfg.seed + k)
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
    held_out = Selection(tables, *(np.array(column, dtype=np.int64) for column in zip(*turns)))
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
    del tables, train, held_out
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


def template_name(cfg: TrainConfig) -> str:
    """The chat template as an error names it."""
    if cfg.template == "plain":
        return "the plain template"
    if cfg.template in ("auto", "tokenizer"):
        return f"the chat template of {cfg.model}"
    return f"the chat template {cfg.template}"


def source_fingerprint(source: str, revision: str | None, files: str | None) -> str:
    """What identifies a source's rows without reading them as rows: the bytes of a local file or folder
    (hashed), the embedded set's code, or a hub dataset's id at its pinned revision (and the files chosen)."""
    if source.startswith("embedded:"):
        code = Path(EMBEDDED_DATASETS[EMBEDDED_DATASET].__code__.co_filename).read_bytes()
        return f"{source}:{hashlib.sha256(code).hexdigest()}"
    path = Path(source).expanduser()
    if not path.exists():
        return f"hub:{source}@{revision}:{files}"
    h = hashlib.sha256()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{file_digest(f)}\0".encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes, remembered in the cache by the file's path, size, modification time and
    inode (as git's index remembers what it hashed): an unchanged file is not read again, so a cache hit on
    a million-row file costs a stat, not a second of hashing."""
    st = path.stat()
    seen = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    memo = cache_root() / "file_digests" / hashlib.sha256(seen.encode()).hexdigest()[:40]
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


def auto_num_proc(num_proc: int | str, conversations: int) -> int:
    """`num_proc="auto"`: the cores this process may use, at most MAX_AUTO_PROC, and one process for sets too
    small to pay for starting more."""
    if num_proc != "auto":
        return num_proc
    if conversations < MIN_ROWS_PER_PROC * 2:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_AUTO_PROC, conversations // MIN_ROWS_PER_PROC))


MAX_AUTO_PROC = 32
MIN_ROWS_PER_PROC = 2000
TOKENIZE_BATCH = 256  # conversations per tokenizer call


def tokenize_to_store(selection: Selection, tokenizer, cfg: TrainConfig, split: str, source_names: list[str],
                      path: Path, template_name: str = "the chat template") -> dict:
    """Encodes the selected conversations (`Dataset.map`, batched, in `num_proc` processes, which read them from
    the memory-mapped tables) into an Arrow dataset at `path`: int32 token ids, a one-bit supervision mask, the
    length and the source of each example (a conversation is one example, or one per assistant turn where the
    template rewrites earlier turns: `multi_turn`), for the examples that pass the length and supervision
    rules; the others are counted. An error names the source, the number of the row the conversation came
    from and the template. Returns the split's statistics, in all and per source (`by_source`), and which
    conversations were kept whole (`kept_mask`)."""
    from datasets import Dataset, Features, List, Value

    features = Features({"input_ids": List(Value("int32")), "supervised": List(Value("bool")),
                         "length": Value("int32"), "source": Value("int16"), "position": Value("int64"),
                         "status": Value("string"), "tokens": Value("int32"), "supervised_tokens": Value("int32"),
                         "roles": Value("string")})
    table = Dataset.from_dict({"table": selection.table.astype(np.int16), "index": selection.index,
                               "source": selection.source.astype(np.int16),
                               "position": np.arange(len(selection), dtype=np.int64)})
    procs = auto_num_proc(cfg.num_proc, len(selection))
    with _map_progress(len(selection), procs):
        encoded = table.map(_encode_batch, batched=True, batch_size=TOKENIZE_BATCH,
                            num_proc=procs if procs > 1 else None,
                            remove_columns=["table", "index", "source", "position"],
                            features=features, keep_in_memory=False, new_fingerprint=_fingerprint(path),
                            cache_file_name=str(path.parent / f"{path.name}-map.arrow"), desc=f"tokenizing ({split})",
                            fn_kwargs=dict(tables=selection.tables, tokenizer=tokenizer, loss_on=cfg.loss_on,
                                           max_length=cfg.max_length, too_long=cfg.too_long,
                                           multi_turn=cfg.multi_turn))
    status = encoded.data.column("status").to_pylist()
    position = encoded.data.column("position").to_numpy()
    for k, reason in enumerate(status):
        if reason in ("no_supervised_tokens", "all_supervised", "too_long_error") or reason.startswith("error:"):
            i = int(position[k])
            raise DataError(_row_error(reason, f"dataset {source_names[selection.source[i]]}: {split}",
                                       selection.row(i), selection.conversation(i), encoded[k]["tokens"], cfg,
                                       template_name))
    kept = np.array([r not in DROPPED for r in status], dtype=bool)
    columns = {name: encoded.data.column(name).to_numpy() for name in ("length", "supervised_tokens", "source")}
    store = encoded.remove_columns(["status", "tokens", "supervised_tokens", "position", "roles"])
    store = store.select(np.flatnonzero(kept)) if kept.any() else Dataset.from_dict(
        {k: [] for k in store.features}, features=store.features)
    store.save_to_disk(str(path))
    for f in path.parent.glob(f"{path.name}-map*.arrow"):
        f.unlink()

    reasons = np.array(status)

    def counts(mine: np.ndarray) -> dict:
        lengths = columns["length"][mine & kept]
        dropped = {r: int(((reasons == r) & mine).sum()) for r in DROPPED}
        return {"examples": int(len(lengths)), "dropped": {r: n for r, n in dropped.items() if n},
                "truncated": int(((reasons == "truncated") & mine).sum()), "tokens": int(lengths.sum()),
                "supervised_tokens": int(columns["supervised_tokens"][mine & kept].sum())}

    everything = counts(np.ones(len(status), dtype=bool))
    if everything["tokens"]:
        lengths = columns["length"][kept]
        everything.update(
            supervised_fraction=round(everything["supervised_tokens"] / everything["tokens"], 4),
            length_percentiles={f"p{q}": int(np.percentile(lengths, q)) for q in (0, 10, 50, 90, 99, 100)})
    whole = np.ones(len(selection), dtype=bool)
    whole[position[~kept]] = False  # a conversation one of whose examples was dropped
    per_conversation = np.bincount(position, minlength=len(selection))
    roles = Counter()
    for text in encoded.data.column("roles").to_pylist():
        roles.update(json.loads(text))
    everything["multi_turn"] = {"mode": cfg.multi_turn, "conversations": len(selection),
                                "examples_per_conversation": {str(n): int(c) for n, c in enumerate(
                                    np.bincount(per_conversation)) if c and n}, "turns_by_role": dict(roles)}
    return {**everything, "by_source": [counts(columns["source"] == k) for k in range(len(source_names))],
            "kept_mask": whole.tolist()}


@contextlib.contextmanager
def _map_progress(rows: int, procs: int):
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


def _fingerprint(path: Path) -> str:
    """`Dataset.map`'s name for its output, given rather than computed (which would hash every argument)."""
    return hashlib.sha256(f"{path.resolve()}\0{os.getpid()}".encode()).hexdigest()[:16]


DROPPED = ("special_token_text", "too_long", "no_supervised_tokens_after_truncation")


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
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if need > free:
        raise ConfigError(f"dataset: the tokenized store needs about {need / 2**30:.2f} GiB in {root} and "
                          f"{free / 2**30:.2f} GiB are free; free some space or point SFT_CACHE elsewhere")


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


def _cache_key(tokenizer, cfg: TrainConfig, *sources) -> str:
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
