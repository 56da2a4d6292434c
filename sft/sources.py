"""Where rows come from: a local file or directory, or a pinned dataset on the Hugging Face hub; and the
run's datasets (`Source`), one or a mixture.

A local source is read by one reader, `row_texts`, as the JSON texts of its rows, which worker processes
parse (`parse_row`). A hub dataset is loaded as the Arrow table `datasets` keeps on disk (`hub_dataset`),
which the workers map over batch by batch (`hub_rows`): neither kind is held as Python rows by the process
that reads it. Rows are plain dicts, as stored; turning them into conversations is sft.formats' job.
"""

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, DataError
from .formats import FORMATS

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# json.loads accepts an escaped lone UTF-16 surrogate ("\ud800"); the str it makes cannot be encoded,
# so rows whose text holds such an escape are checked before anything downstream tries.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

SOURCE_OPTIONS = ("format", "revision", "files", "split", "max_rows")


@dataclass(frozen=True)
class Source:
    """One dataset of a run: where its rows come from, how they are read, and how many go into training."""
    dataset: str
    share: float | int | None  # a fraction of its training rows (above 1 repeats them), a row count, None: all
    format: str
    revision: str | None
    files: str | None
    split: str
    max_rows: int | None
    name: str  # how statistics and metrics name it


def mixture_sources(entries, *, default_format: str, default_split: str) -> list[Source]:
    """The sources of a mixture's entries, (source, share) or (source, share, {options}), each option
    defaulting to the run's own (`default_format`, `default_split`). A source given twice is named with its
    count (name#2); one given with files is named with them (name:files)."""
    out, names = [], Counter()
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) in (2, 3)):
            raise ConfigError(f"datasets: each entry is (source, share) or (source, share, {{options}}), "
                              f"got {entry!r}")
        source, share, options = (*entry, {}) if len(entry) == 2 else entry
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"datasets: a source is a path, a hub id or 'embedded:...', got {source!r}")
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                                  or not math.isfinite(share) or share <= 0):
            raise ConfigError(f"datasets: {source}: the share is a fraction of its rows (float > 0), a row "
                              f"count (int >= 1) or None for all of them, got {share!r}")
        opts = _source_options(source, options, default_format, default_split)
        name = source + (f":{opts['files']}" if opts["files"] else "")
        names[name] += 1
        name += f"#{names[name]}" if names[name] > 1 else ""
        out.append(Source(source, share, opts["format"], opts["revision"], opts["files"], opts["split"],
                          opts["max_rows"], name))
    return out


def _source_options(source: str, options, default_format: str, default_split: str) -> dict:
    if not isinstance(options, dict):
        raise ConfigError(f"datasets: {source}: options are a dict, got {options!r}")
    unknown = set(options) - set(SOURCE_OPTIONS)
    if unknown:
        raise ConfigError(f"datasets: {source}: unknown option {sorted(unknown)[0]!r}; the options are "
                          f"{', '.join(SOURCE_OPTIONS)}")
    opts = {"format": default_format, "revision": None, "files": None, "split": default_split,
            "max_rows": None, **options}
    formats = ("auto", *FORMATS)
    if opts["format"] not in formats:
        raise ConfigError(f"datasets: {source}: format: {opts['format']!r} is not one of "
                          f"{', '.join(map(repr, formats))}")
    for key in ("revision", "files"):
        if opts[key] is not None and not isinstance(opts[key], str):
            raise ConfigError(f"datasets: {source}: {key} is a string, got {opts[key]!r}")
    if not isinstance(opts["split"], str):
        raise ConfigError(f"datasets: {source}: split is a string, got {opts['split']!r}")
    if opts["max_rows"] is not None and (isinstance(opts["max_rows"], bool)
                                         or not isinstance(opts["max_rows"], int) or opts["max_rows"] < 1):
        raise ConfigError(f"datasets: {source}: max_rows is a count >= 1, got {opts['max_rows']!r}")
    return opts


def local_path(source: str | os.PathLike) -> Path | None:
    """The existing local file or directory `source` names, or None for a hub dataset id. An existing local
    path wins over a hub id of the same name, and a source that looks like a path but does not exist is an
    error: a typo in a path must never quietly download some other dataset."""
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.startswith((".", "/", "~")) or path.suffix.lower() in _READERS:
        raise DataError(f"dataset path {source} does not exist")
    if _HUB_ID.fullmatch(source):
        return None
    raise DataError(
        f"dataset source {source!r} is neither an existing local path "
        f"nor a hub dataset id of the form owner/name"
    )


def row_texts(source: str | os.PathLike, *, max_rows: int | None = None) -> Iterator[tuple[str, str, int, bool]]:
    """The rows of a local file or directory (its files in name order) as JSON texts, for parsing in worker
    processes: (text, file, number, raw). A JSON-lines file's lines come as they are (`raw`: not yet parsed,
    `number` is the line; `parse_row` parses and checks them); every other row is parsed here and serialized
    (`number` counts rows), with a value JSON cannot hold (a date, bytes) as an object, which no format
    accepts where text or a list belongs. Asking for the first `max_rows` rows reads about that many. Raises
    DataError when the source has no rows."""
    _check_max_rows(max_rows)
    path = local_path(source)
    if path is None:
        raise DataError(f"dataset path {os.fspath(source)} does not exist")
    files = [path] if path.is_file() else _local_files(path)
    count = 0
    for item in islice(chain.from_iterable(_file_texts(p) for p in files), max_rows):
        count += 1
        yield item
    if not count:
        raise DataError(f"dataset {os.fspath(source)} has no rows")


def hub_dataset(source: str, *, revision: str | None, split: str = "train", max_rows: int | None = None,
                data_files: str | list[str] | None = None):
    """A hub dataset at its pinned revision (its `data_files`, its `split`), as the `datasets.Dataset` that
    `datasets` downloads once and memory-maps from its cache: worker processes map over its Arrow table
    (`hub_rows`). With `max_rows`, only the first rows are streamed, so a trial on the first N rows of a large
    set never downloads all of it. Raises DataError when it has no rows."""
    import datasets

    _check_max_rows(max_rows)
    if revision is None:
        raise ConfigError(
            f"{source!r} is not a local path, so it is read as a hub dataset id, and a hub dataset "
            f"needs a pinned revision (a commit sha or tag): the same id can point to different data "
            f"tomorrow, and a run whose data changed underneath it cannot be reproduced or compared"
        )
    try:
        dataset = datasets.load_dataset(source, revision=revision, split=split, streaming=max_rows is not None,
                                        data_files=data_files)
        if max_rows is not None:  # the first rows only: a bounded list, written to an Arrow table
            dataset = datasets.Dataset.from_list(list(dataset.take(max_rows)), features=dataset.features)
    except Exception as e:  # network, auth, missing repo or split: each library raises its own type
        raise DataError(f"{_hub_failure(source, revision, split)}: {_one_line(e)}") from e
    if not len(dataset):
        raise DataError(f"dataset {source} has no rows")
    return dataset


def hub_rows(batch: pa.Table, source: str, revision: str, split: str) -> list[dict | DataError]:
    """The rows of a batch of a hub dataset's Arrow table as their JSON texts hold them (`dumps_row`), for a
    worker process; where a value of the batch has no Python form (a date out of range, bytes that are not
    UTF-8), each row of the batch is that DataError."""
    try:
        rows = batch.to_pylist()
    except _UNCONVERTIBLE as e:
        return [DataError(f"{_hub_failure(source, revision, split)}: {_one_line(e)}")] * batch.num_rows
    return [json.loads(dumps_row(row)) for row in rows]


def _hub_failure(source: str, revision: str, split: str) -> str:
    return f"could not fetch dataset {source!r} (revision {revision!r}, split {split!r}) from the hub"


def parse_row(text: str, file: str, number: int, raw: bool) -> dict:
    """A row from `row_texts`, parsed; a raw line is checked, and an error names its file and line."""
    if not raw:
        return json.loads(text)
    try:
        item = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _bad_json(Path(file), number, e) from None
    return _as_row(item, f"dataset file {file}, line {number}", bool(_SURROGATE_ESCAPE.search(text)))


def _file_texts(path: Path) -> Iterator[tuple[str, str, int, bool]]:
    if path.suffix.lower() not in _READERS:
        raise DataError(f"dataset file {path} has an unsupported type; expected one of {', '.join(_READERS)}")
    if path.suffix.lower() in (".json", ".jsonl") and not _holds_one_list(path):  # JSON lines: unparsed
        lines = ((n, line) for n, line in _decoded_lines(path) if line.strip())
        try:
            n, line = next(lines, (0, ""))
            if n:
                try:  # here, so that a file holding one JSON object gets its own message
                    json.loads(line)
                except (ValueError, RecursionError) as e:
                    _refuse_one_object(path)
                    raise _bad_json(path, n, e) from None
                yield line, str(path), n, True
            for n, line in lines:
                yield line, str(path), n, True
        except NotUTF8 as e:  # the lines before it are parsed later, elsewhere: the first bad one is the error
            raise _first_bad_line(path, e.lineno) or e from None
        return
    try:
        for n, row in enumerate(_READERS[path.suffix.lower()](path), 1):
            yield dumps_row(row), str(path), n, False
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


class NotUTF8(DataError):
    """A line of a dataset file that is not UTF-8 text."""

    def __init__(self, message: str, lineno: int):
        super().__init__(message)
        self.lineno = lineno


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of a text file (from 1, newline removed), each decoded on its own: a line that is not UTF-8
    raises NotUTF8 when it is reached, after every line before it. A BOM may open the file."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            skip = 3 if n == 1 and raw.startswith(b"\xef\xbb\xbf") else 0
            try:
                text = raw[skip:].decode("utf-8")
            except UnicodeDecodeError as bad:
                raise NotUTF8(f"dataset file {path}, line {n} is not UTF-8 text: {bad.reason} (byte "
                              f"0x{raw[skip + bad.start]:02x} at column {skip + bad.start + 1})", n) from None
            yield n, text.rstrip("\r\n")


def _first_bad_line(path: Path, before: int) -> DataError | None:
    """The error of the first line before line `before` that is not a row (as `parse_row` checks it)."""
    for n, line in _decoded_lines(path):
        if n >= before:
            return None
        if line.strip():
            try:
                parse_row(line, str(path), n, True)
            except DataError as e:
                return e
    return None


def dumps_row(row: dict) -> str:
    """A row as JSON text; a value JSON cannot hold (a date, bytes) becomes an object naming its type."""
    return json.dumps(row, ensure_ascii=False, default=lambda value: {"not JSON": type(value).__name__})


def _check_max_rows(max_rows) -> None:
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ConfigError(f"max_rows must be a positive integer or None, got {max_rows!r}")


def _holds_one_list(path: Path) -> bool:
    """A .json file may hold one list of objects or JSON lines; its first character tells which."""
    first = next((line for _, line in _decoded_lines(path) if line.strip()), "")
    return first.lstrip().startswith("[")


def _local_files(path: Path) -> list[Path]:
    # Hidden entries are skipped: they are caches and tool files (.cache/, .git/), not data.
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _READERS
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"dataset directory {path} holds no {', '.join(_READERS)} files")
    return files


def _not_utf8(path: Path, e: UnicodeDecodeError) -> DataError:
    """The decoder's position is relative to the chunk it was given, so the bad line is found afresh."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return DataError(f"dataset file {path}, line {lineno} is not UTF-8 text: {bad.reason} "
                                 f"(byte 0x{line[bad.start]:02x} at column {bad.start + 1})")
    return DataError(f"dataset file {path} is not UTF-8 text: {e}")


def _iter_json_list(path: Path) -> Iterator[dict]:
    """The rows of a .json file holding one list of objects (JSON lines are `_file_texts`' own)."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        items = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _bad_json(path, getattr(e, "lineno", None), e) from None
    check_text = bool(_SURROGATE_ESCAPE.search(text))
    for i, item in enumerate(items):
        yield _as_row(item, f"dataset file {path}, item {i}", check_text)


def _refuse_one_object(path: Path) -> None:
    """A first line that is not JSON may open a file that is one JSON object over many lines (often
    {"data": [...]}): say so, instead of calling that line invalid."""
    try:
        whole = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError):
        return
    if isinstance(whole, dict):
        raise DataError(f"dataset file {path} holds one JSON object (keys {sorted(whole)[:5]}), not rows: "
                        f"expected a list of row objects, or one row object per line")


def _bad_json(path: Path, lineno: int | None, e: Exception) -> DataError:
    """JSONDecodeError is a syntax error; a plain ValueError (an integer of over 4300 digits) or a
    RecursionError (nesting too deep) comes from valid JSON that Python's parser still refuses."""
    where = f"dataset file {path}" + (f", line {lineno}" if lineno is not None else "")
    if isinstance(e, json.JSONDecodeError):
        return DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})")
    return DataError(f"{where}: cannot parse JSON ({e})")


def _as_row(item, where: str, check_text: bool) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object (one row), got {type(item).__name__}")
    if check_text:
        try:
            json.dumps(item, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: the escape {e.object[e.start].encode('unicode_escape').decode()} is half "
                            f"of a UTF-16 surrogate pair without its other half, so the text is not valid "
                            f"Unicode") from None
    return item


def _iter_parquet(path: Path) -> Iterator[dict]:
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            try:
                rows = batch.to_pylist()
            except _UNCONVERTIBLE as e:
                raise DataError(f"cannot read parquet file {path}: column {_unconvertible_column(batch)!r} holds "
                                f"a value Python cannot represent ({e})") from None
            yield from rows
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # corrupt pages, corrupt names in the footer
        raise DataError(f"cannot read parquet file {path}: {_one_line(e)}") from None


# A date, time or duration outside the range of Python's datetime; a string column holding bytes that
# are not UTF-8 (Arrow does not check them when writing).
_UNCONVERTIBLE = (OverflowError, UnicodeDecodeError)


def _unconvertible_column(batch: pa.RecordBatch) -> str | None:
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            column.to_pylist()
        except _UNCONVERTIBLE:
            return name
    return None


def _one_line(e: Exception) -> str:
    """Arrow and pandas messages may hold newlines, which would split the one-line error a user sees."""
    return " ".join(str(e).split())


def _iter_csv(path: Path) -> Iterator[dict]:
    # Every cell is text; without keep_default_na an empty cell would become NaN, a float.
    # index_col=False: by default, rows with one field more than the header (a trailing comma, an
    # unnamed column) make pandas read the first field as the index and shift every column left.
    # It then warns that it drops the extra fields; that warning is an error here.
    # The filter is set around each read only, not across the yields, where the caller's code runs.
    def read(next_chunk):
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return next_chunk()

    try:
        reader = read(lambda: pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=1024, index_col=False))
        while (chunk := read(lambda: next(reader, None))) is not None:
            yield from chunk.to_dict("records")
    except pd.errors.EmptyDataError:
        return
    except pd.errors.ParserWarning:
        raise DataError(f"cannot parse CSV file {path}: its rows have more fields than its header "
                        f"(a trailing comma, or a column without a name)") from None
    except pd.errors.ParserError as e:
        raise DataError(f"cannot parse CSV file {path}: {_one_line(e)}") from None


_READERS = {".json": _iter_json_list, ".jsonl": _iter_json_list, ".parquet": _iter_parquet, ".csv": _iter_csv}
