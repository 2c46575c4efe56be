"""A custom dataset's YAML schema, parsed in one place (reading, caching, scoring read it here)::

    name: my-log
    file: clicks.csv            # relative to the schema file
    sep: ","                    # CSV only
    fields:                     # prompt name -> column
      user ID: uid
      item title: title
    label: {column: click}      # already 0/1 ...
    # label: {column: rating, threshold: 3, drop_equal: false}   # ... or rating > threshold
    order: ts                   # optional (numbers or ISO dates/times); file order otherwise
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .errors import DataError


def is_schema(dataset: str) -> bool:
    """Whether ``data.dataset`` names a custom schema file rather than a known dataset."""
    return str(dataset).endswith((".yaml", ".yml"))


@dataclass(frozen=True)
class LabelRule:
    """How a raw column becomes the 0/1 label, the one rule for reading training data and for
    scoring new rows (saved with a run): ``value > threshold`` (rows equal to the threshold are
    no samples with ``drop_equal``), or, without a threshold, values already 0/1."""

    column: str
    threshold: float | None = None
    drop_equal: bool = False

    @classmethod
    def from_schema(cls, spec: dict | str) -> "LabelRule":
        spec = spec if isinstance(spec, dict) else {"column": spec}
        threshold = spec.get("threshold")
        return cls(spec["column"], None if threshold is None else float(threshold), bool(spec.get("drop_equal", False)))

    def to_dict(self) -> dict:
        return {"column": self.column, **({"threshold": self.threshold, "drop_equal": self.drop_equal}
                                          if self.threshold is not None else {})}

    def apply(self, raw: pd.Series, source: str) -> tuple[np.ndarray, np.ndarray]:
        """``(labels (N,) int8, keep (N,) bool)`` of the raw column; one error naming the row of the
        first value that is empty, not a number, or (without a threshold) not 0/1."""
        values = pd.to_numeric(raw, errors="coerce")
        if values.isna().any():
            row = int(np.argmax(values.isna().to_numpy()))
            raise DataError(f"{source}: row {row + 1}, label column {self.column!r} is empty or not a number "
                            f"({raw.iloc[row]!r})")
        if self.threshold is None:
            if not values.isin([0, 1]).all():
                row = int(np.argmax(~values.isin([0, 1]).to_numpy()))
                raise DataError(f"{source}: row {row + 1}, label column {self.column!r} must be 0 or 1 "
                                "(or give a threshold in the schema)")
            return (values.to_numpy() > 0.5).astype(np.int8), np.ones(len(values), dtype=bool)
        keep = (values != self.threshold).to_numpy() if self.drop_equal else np.ones(len(values), dtype=bool)
        return (values > self.threshold).to_numpy().astype(np.int8), keep


@dataclass(frozen=True)
class CustomSchema:
    """A parsed schema: where its file is, which column each field and the label come from, and
    its order column (None: file order)."""

    path: Path  # the schema file
    name: str
    file: Path  # the data file (CSV or Parquet), resolved against the schema's folder
    fields: dict[str, str]  # field -> column
    label: LabelRule
    order: str | None = None
    sep: str = ","

    @classmethod
    def load(cls, path: str | Path) -> "CustomSchema":
        """The schema at ``path``; one error naming it when it cannot be read or lacks a key."""
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: schema file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise DataError(f"{path}: cannot read schema ({err})") from err
        for key in ("file", "fields", "label"):
            if key not in raw:
                raise DataError(f"{path}: schema lacks the key {key!r}")
        return cls(path, raw.get("name", path.stem), (path.parent / raw["file"]).resolve(), dict(raw["fields"]),
                   LabelRule.from_schema(raw["label"]), raw.get("order") or None, raw.get("sep", ","))
