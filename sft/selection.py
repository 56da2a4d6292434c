"""Which rows a run trains and evaluates on: the seeded held-out split, each dataset's share of a mixture, and
the selected conversations by reference (`Selection`), as indices into the read sources' memory-mapped tables.

Each transform is a pure function of its rows and a seed, so a rerun with the same seed selects the same rows.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


def shuffle_rows(rows: Iterable, seed: int) -> list:
    """The rows in a seeded random order. A private Random keeps the order a function of the seed alone,
    whatever else draws numbers.

    >>> shuffle_rows(range(6), seed=0)
    [4, 2, 1, 0, 5, 3]
    >>> shuffle_rows(range(6), seed=0) == shuffle_rows(range(6), seed=0)
    True
    """
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def split_heldout(rows: list, *, eval_rows: int | float, seed: int) -> tuple[list, list]:
    """Returns (train, heldout). The held-out rows are a seeded random sample, not the file's tail:
    files are often ordered by source or topic, and the tail would then not represent the whole.
    `eval_rows` is a count of rows, or a fraction of them (rounded).

    >>> split_heldout(list("abcdefghij"), eval_rows=0.2, seed=0)
    (['b', 'f', 'd', 'e', 'c', 'a', 'j', 'g'], ['h', 'i'])
    >>> split_heldout(list("abcdefghij"), eval_rows=3, seed=0)[1]
    ['h', 'i', 'b']
    >>> split_heldout(list("abc"), eval_rows=3, seed=0)
    Traceback (most recent call last):
    ...
    sft.errors.ConfigError: eval_rows=3 holds out 3 of 3 rows, leaving no rows to train on
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
    rows makes up the rest; kept in the rows' order.

    >>> take_share(list("abcdef"), None, seed=0)
    ['a', 'b', 'c', 'd', 'e', 'f']
    >>> take_share(list("abcdef"), 0.5, seed=0)
    ['a', 'd', 'f']
    >>> take_share(list("abc"), 2.0, seed=0)
    ['a', 'b', 'c', 'a', 'b', 'c']
    >>> take_share(list("abc"), 4, seed=0)
    ['a', 'b', 'c', 'b']
    """
    if share is None:
        return rows
    n = len(rows)
    count = round(share * n) if isinstance(share, float) else share
    if count < 1:
        raise ConfigError(f"a share of {share!r} of its {n} training rows is no rows; raise it")
    whole, rest = divmod(count, n)
    picked = sorted(random.Random(seed).sample(range(n), rest))
    return rows * whole + [rows[i] for i in picked]


@dataclass
class Selection:
    """Conversations to tokenize, by reference: example i is row `index[i]` of `tables[table[i]]` (a read
    source's texts, `sft.data.ReadSource`) and counts for dataset `source[i]`."""
    tables: list
    table: np.ndarray
    index: np.ndarray
    source: np.ndarray

    @classmethod
    def every_usable_row(cls, read) -> "Selection":
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
