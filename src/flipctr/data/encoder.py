"""Categorical feature encoding: vocabularies fitted on the training rows only.

Global id layout (one embedding table for all fields)::

    0                      the shared <MASK> id (one for all fields; FLIP 3.3.1)
    offset_f + 0           field f's OOV id (values unseen in the fitting rows, or rarer than min_count)
    offset_f + 1 .. V_f    field f's vocabulary, most frequent first

The saved :class:`FeatureMap` is the one contract between data and model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..utils import atomic_path, write_json
from .errors import DataError

MASK_ID = 0


@dataclass
class FieldInfo:
    name: str
    offset: int  # global id of this field's OOV slot
    size: int  # vocabulary size including the OOV slot


@dataclass
class FeatureMap:
    fields: list[FieldInfo]
    num_features: int  # size of the global table, <MASK> included
    min_count: int
    fit_rows: int
    mask_id: int = MASK_ID

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "FeatureMap":
        return cls(**{**raw, "fields": [FieldInfo(**f) for f in raw["fields"]]})

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "FeatureMap":
        return cls.from_dict(json.loads(Path(path).read_text()))


class FeatureEncoder:
    """Fit per-field vocabularies on training rows, then map any rows to global int ids."""

    def __init__(self, fields: list[str], min_count: int = 1):
        if min_count < 1:
            raise ValueError("min_count must be >= 1")
        self.fields = list(fields)
        self.min_count = min_count
        self.vocab: dict[str, pd.Index] = {}
        self.counts: np.ndarray | None = None  # training frequency per global id
        self.feature_map: FeatureMap | None = None

    def fit(self, values: pd.DataFrame) -> "FeatureEncoder":
        if len(values) == 0:
            raise DataError("cannot fit the feature encoder on an empty training split")
        infos, counts, offset = [], [np.zeros(1, dtype=np.int64)], 1
        for name in self.fields:
            if name not in values.columns:
                raise DataError(f"column {name!r} missing from the table being encoded")
            freq = values[name].value_counts(sort=False)
            freq.index = pd.Index(freq.index, dtype=object)  # a categorical's: its categories as values
            kept = freq[freq >= self.min_count]
            # most frequent first; ties by value so the vocabulary is deterministic
            kept = kept.sort_index(kind="stable").sort_values(ascending=False, kind="stable")
            self.vocab[name] = pd.Index(kept.index, dtype=object)
            oov_count = int(freq[freq < self.min_count].sum())
            counts.append(np.concatenate([[oov_count], kept.to_numpy(np.int64)]))
            infos.append(FieldInfo(name, offset, len(kept) + 1))
            offset += len(kept) + 1
        self.counts = np.concatenate(counts)
        self.feature_map = FeatureMap(infos, offset, self.min_count, len(values))
        return self

    def transform(self, values: pd.DataFrame) -> np.ndarray:
        """Rows -> ``(N, F)`` int32 global ids; unseen values get their field's OOV id."""
        if self.feature_map is None:
            raise RuntimeError("FeatureEncoder.transform called before fit")
        dtype = np.int32 if self.feature_map.num_features < 2**31 else np.int64
        out = np.empty((len(values), len(self.fields)), dtype=dtype)
        for j, info in enumerate(self.feature_map.fields):
            column = values[info.name]
            if isinstance(column.dtype, pd.CategoricalDtype):  # each category looked up once
                per_category = self.vocab[info.name].get_indexer(pd.Index(column.cat.categories, dtype=object))
                codes = column.cat.codes.to_numpy()
                local = np.where(codes >= 0, per_category[codes], -1) + 1
            else:
                local = self.vocab[info.name].get_indexer(column) + 1  # -1 (unseen) -> 0 (OOV)
            out[:, j] = local + info.offset
        return out

    def save(self, folder: Path) -> None:
        """``feature_map.json`` (layout) and ``vocab.parquet`` (field, value, id, count)."""
        assert self.feature_map is not None and self.counts is not None
        self.feature_map.save(folder / "feature_map.json")
        rows = []
        for info in self.feature_map.fields:
            values = ["<OOV>", *map(str, self.vocab[info.name])]
            ids = np.arange(info.offset, info.offset + info.size)
            rows.append(pd.DataFrame({"field": info.name, "value": values, "id": ids,
                                      "count": self.counts[ids]}))
        with atomic_path(folder / "vocab.parquet") as tmp:
            pd.concat(rows, ignore_index=True).to_parquet(tmp, index=False)
        with atomic_path(folder / "counts.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, self.counts)

    @classmethod
    def load(cls, folder: Path) -> "FeatureEncoder":
        fmap = FeatureMap.load(folder / "feature_map.json")
        enc = cls(fmap.field_names, fmap.min_count)
        vocab = pd.read_parquet(folder / "vocab.parquet")
        for info in fmap.fields:
            part = vocab[vocab["field"] == info.name].sort_values("id")
            enc.vocab[info.name] = pd.Index(part["value"].iloc[1:].to_list(), dtype=object)
        enc.counts = np.load(folder / "counts.npy")
        enc.feature_map = fmap
        return enc
