"""The one in-memory form every reader produces and every later stage consumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import DataError


@dataclass
class Table:
    """Labelled samples with one text column per field.

    ``fields`` are the names humans (and prompts) use, e.g. ``"zip code"``; ``values`` holds
    one string column per field under that name; ``labels`` is 0/1 ``int8``. Readers give the
    rows in file order; ``time`` holds the keys of a chronological order (most significant
    column first, ties broken by the next), or None where the data has no timestamps.
    :func:`flipctr.data.splits.order_table` puts the rows into split order.
    """

    name: str
    fields: list[str]
    values: pd.DataFrame
    labels: np.ndarray
    time: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        missing = [f for f in self.fields if f not in self.values.columns]
        if missing:
            raise DataError(f"{self.name}: table lacks field columns {missing}")
        if len(self.values) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.values)} rows but {len(self.labels)} labels")
        if len(self.values) == 0:
            raise DataError(f"{self.name}: no labelled samples")
        if self.time is not None and len(self.time) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.time)} time keys for {len(self.labels)} rows")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray | slice) -> "Table":
        """The samples at ``rows`` (positions), in that order."""
        time = None if self.time is None else self.time.iloc[rows].reset_index(drop=True)
        return Table(self.name, self.fields, self.values.iloc[rows].reset_index(drop=True),
                     self.labels[rows], time)
