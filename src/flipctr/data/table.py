"""The one in-memory form every reader produces and every later stage consumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import DataError


@dataclass
class Table:
    """Labelled samples with one text column per field, rows already in split order.

    ``fields`` are the names humans (and prompts) use, e.g. ``"zip code"``; ``values`` holds
    one string column per field under that name; ``labels`` is 0/1 ``int8``.
    """

    name: str
    fields: list[str]
    values: pd.DataFrame
    labels: np.ndarray
    order_key: str  # what the rows are sorted by ("timestamp", "file order", ...)

    def __post_init__(self) -> None:
        missing = [f for f in self.fields if f not in self.values.columns]
        if missing:
            raise DataError(f"{self.name}: table lacks field columns {missing}")
        if len(self.values) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.values)} rows but {len(self.labels)} labels")
        if len(self.values) == 0:
            raise DataError(f"{self.name}: no labelled samples")

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "Table":
        """The first ``n`` samples in split order (``--limit``)."""
        return Table(self.name, self.fields, self.values.iloc[:n].reset_index(drop=True),
                     self.labels[:n], self.order_key)
