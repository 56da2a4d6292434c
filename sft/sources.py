"""Where rows come from: a local file or directory, or a pinned dataset on the Hugging Face hub.

Rows come back as plain dicts, as stored; turning them into conversations is sft.formats' job.
Every reader is a generator, so asking for the first N rows reads (or downloads) about N rows.
"""

import json
import os
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, DataError

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# json.loads accepts an escaped lone UTF-16 surrogate ("\ud800"); the str it makes cannot be encoded,
# so rows whose text holds such an escape are checked before anything downstream tries.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def load_rows(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    split: str = "train",
    max_rows: int | None = None,
    streaming: bool | None = None,
    data_files: str | list[str] | None = None,
) -> list[dict]:
    """An existing local path wins over a hub id of the same name, and a source that looks like a
    path but does not exist is an error: a typo in a path must never quietly download some other
    dataset. `split` and `streaming` apply to hub datasets; a local file or directory is one split.
    """
    _check_max_rows(max_rows)
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.exists():
        rows = take_rows(_iter_local(path), max_rows)
    elif source.startswith((".", "/", "~")) or path.suffix.lower() in _READERS:
        raise DataError(f"dataset path {source} does not exist")
    elif _HUB_ID.fullmatch(source):
        rows = _load_hub(source, revision=revision, split=split, max_rows=max_rows, streaming=streaming,
                         data_files=data_files)
    else:
        raise DataError(
            f"dataset source {source!r} is neither an existing local path "
            f"nor a hub dataset id of the form owner/name"
        )
    if not rows:
        raise DataError(f"dataset {source} has no rows")
    return rows


def row_texts(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    split: str = "train",
    max_rows: int | None = None,
    data_files: str | list[str] | None = None,
) -> Iterator[tuple[str, str, int, bool]]:
    """The rows of a source as JSON texts, in the order and with the checks of `load_rows`, for parsing in
    worker processes: (text, file, number, raw). A JSON-lines file's lines come as they are (`raw`: not yet
    parsed, `number` is the line; `parse_row` parses and checks them); every other row is parsed here and
    serialized (`number` counts rows), with a value JSON cannot hold (a date, bytes) as an object, which no
    format accepts where text or a list belongs, as before. Raises DataError, as `load_rows` does, when the
    source has no rows."""
    _check_max_rows(max_rows)
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.exists():
        files = [path] if path.is_file() else _local_files(path)
        texts = chain.from_iterable(_file_texts(p) for p in files)
    else:
        rows = load_rows(source, revision=revision, split=split, max_rows=max_rows, data_files=data_files)
        texts = ((dumps_row(row), source, n, False) for n, row in enumerate(rows, 1))
    count = 0
    for item in islice(texts, max_rows):
        count += 1
        yield item
    if not count:
        raise DataError(f"dataset {source} has no rows")


def parse_row(text: str, file: str, number: int, raw: bool) -> dict:
    """A row from `row_texts`, with the errors `load_rows` raises for it."""
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


def take_rows(rows: Iterable[dict], max_rows: int | None) -> list[dict]:
    """Stops pulling after max_rows, so a streamed hub dataset only downloads what it yields."""
    return list(islice(rows, max_rows))


def _load_hub(source: str, *, revision, split, max_rows, streaming, data_files=None) -> list[dict]:
    if revision is None:
        raise ConfigError(
            f"{source!r} is not a local path, so it is read as a hub dataset id, and a hub dataset "
            f"needs a pinned revision (a commit sha or tag): the same id can point to different data "
            f"tomorrow, and a run whose data changed underneath it cannot be reproduced or compared"
        )
    if streaming is None:
        streaming = max_rows is not None
    try:
        dataset = datasets.load_dataset(source, revision=revision, split=split, streaming=streaming,
                                        data_files=data_files)
        return take_rows(dataset, max_rows)
    except Exception as e:  # network, auth, missing repo or split: each library raises its own type
        raise DataError(
            f"could not fetch dataset {source!r} (revision {revision!r}, split {split!r}) from the hub: {_one_line(e)}"
        ) from e


def _iter_local(path: Path) -> Iterator[dict]:
    if path.is_file():
        if path.suffix.lower() not in _READERS:
            raise DataError(
                f"dataset file {path} has an unsupported type; expected one of {', '.join(_READERS)}"
            )
        return _iter_file(path)
    return chain.from_iterable(_iter_file(p) for p in _local_files(path))


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


def _iter_file(path: Path) -> Iterator[dict]:
    try:
        yield from _READERS[path.suffix.lower()](path)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


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


def _iter_json(path: Path) -> Iterator[dict]:
    if _holds_one_list(path):
        text = path.read_text(encoding="utf-8-sig")
        try:
            items = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise _bad_json(path, getattr(e, "lineno", None), e) from None
        check_text = bool(_SURROGATE_ESCAPE.search(text))
        for i, item in enumerate(items):
            yield _as_row(item, f"dataset file {path}, item {i}", check_text)
        return
    rows = 0
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as e:
            if rows == 0:
                _refuse_one_object(path)
            raise _bad_json(path, lineno, e) from None
        rows += 1
        yield _as_row(item, f"dataset file {path}, line {lineno}", bool(_SURROGATE_ESCAPE.search(line)))


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


_READERS = {".json": _iter_json, ".jsonl": _iter_json, ".parquet": _iter_parquet, ".csv": _iter_csv}


def shuffle_rows(rows: Iterable, seed: int) -> list:
    """A private Random keeps the order a function of the seed alone, whatever else draws numbers."""
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def split_heldout(rows: list, *, eval_rows: int | float, seed: int) -> tuple[list, list]:
    """Returns (train, heldout). The held-out rows are a seeded random sample, not the file's tail:
    files are often ordered by source or topic, and the tail would then not represent the whole.
    """
    n = len(rows)
    if isinstance(eval_rows, float):
        if not 0 < eval_rows < 1:
            raise ConfigError(
                f"eval_rows as a fraction must be between 0 and 1 (exclusive), got {eval_rows!r}"
            )
        count = round(n * eval_rows)
        if count < 1:
            raise ConfigError(
                f"eval_rows={eval_rows!r} of {n} rows rounds to 0 held-out rows; hold out at least one"
            )
    elif isinstance(eval_rows, int) and not isinstance(eval_rows, bool) and eval_rows > 0:
        count = eval_rows
    else:
        raise ConfigError(
            f"eval_rows must be a positive row count or a fraction in (0, 1), got {eval_rows!r}"
        )
    if count >= n:
        raise ConfigError(
            f"eval_rows={eval_rows!r} holds out {count} of {n} rows, leaving no rows to train on"
        )
    shuffled = shuffle_rows(rows, seed)
    return shuffled[count:], shuffled[:count]


def take_share(rows: list, share: int | float | None, *, seed: int) -> list:
    """The training rows a dataset of a mixture gives: all of them (None), a fraction (a float) or a count (an
    int). Above 1 (or above the row count), every row comes that many whole times and a seeded sample of the
    rows makes up the rest; kept in the rows' order."""
    if share is None:
        return rows
    n = len(rows)
    count = round(share * n) if isinstance(share, float) else share
    if count < 1:
        raise ConfigError(f"a share of {share!r} of its {n} training rows is no rows; raise it")
    whole, rest = divmod(count, n)
    picked = sorted(random.Random(seed).sample(range(n), rest))
    return rows * whole + [rows[i] for i in picked]
