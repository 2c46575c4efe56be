"""Splits: the table is put into one order, then cut into contiguous ranges (train, valid, test).

Orders (``data.order``):

- ``time``: chronological, a stable sort on the reader's time keys (ML-1M: timestamp, then
  user ID, then movie ID); for data with timestamps.
- ``shuffle``: a seeded random permutation (``data.shuffle_seed``); BookCrossing has no
  timestamps and its file is grouped by user.
- ``file``: the rows as the raw file holds them. On BookCrossing this is a cold-start
  benchmark: nearly every test user is unseen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .table import Table

ORDERS = ("time", "shuffle", "file")


def order_table(table: Table, order: str, seed: int) -> tuple[Table, str]:
    """``table`` in split order, and a description of that order (for stats and meta.json)."""
    if order == "time":
        if table.time is None:
            raise DataError(f"{table.name}: data.order=time needs timestamps, and this data has none; "
                            "use data.order=shuffle or data.order=file")
        keys = [table.time[c].to_numpy() for c in reversed(table.time.columns)]
        return table.take(np.lexsort(keys)), "time (" + ", ".join(table.time.columns) + ")"
    if order == "shuffle":
        return table.take(np.random.default_rng(seed).permutation(len(table))), f"shuffle (seed {seed})"
    if order == "file":
        return table, "file"
    raise DataError(f"data.order must be one of {ORDERS}, not {order!r}")


@dataclass(frozen=True)
class SplitSizes:
    train: int
    valid: int
    test: int

    @property
    def total(self) -> int:
        return self.train + self.valid + self.test

    def bounds(self, name: str) -> tuple[int, int]:
        """Row range ``[start, stop)`` of ``train``, ``valid``, ``test`` or ``train+valid``."""
        ranges = {
            "train": (0, self.train),
            "valid": (self.train, self.train + self.valid),
            "test": (self.train + self.valid, self.total),
            "train+valid": (0, self.train + self.valid),
        }
        if name not in ranges:
            raise KeyError(f"unknown split {name!r}; expected one of {list(ranges)}")
        return ranges[name]


def split_sizes(n: int, test_fraction: float = 0.1, valid_fraction: float = 1 / 9) -> SplitSizes:
    """First ``1 - test_fraction`` of the rows train (paper: 90 %), the rest test; the last
    ``valid_fraction`` of the training part becomes validation (default 1/9 -> 80/10/10)."""
    if not 0 < test_fraction < 1 or not 0 <= valid_fraction < 1:
        raise DataError(f"split fractions out of range: test {test_fraction}, valid {valid_fraction}")
    trainval = int(n * (1 - test_fraction))
    valid = int(round(trainval * valid_fraction))
    sizes = SplitSizes(trainval - valid, valid, n - trainval)
    for name in ("train", "valid", "test"):
        if getattr(sizes, name) == 0 and not (name == "valid" and valid_fraction == 0):
            raise DataError(
                f"split {name!r} is empty: {n} samples with test_fraction={test_fraction}, "
                f"valid_fraction={valid_fraction:.4f}; use more samples (--limit) or other fractions"
            )
    return sizes
