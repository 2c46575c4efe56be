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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..utils import atomic_path, write_json
from .errors import DataError
from .table import RowFile, ValueCodes

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
        self.vocab: dict[str, pa.Array] = {}  # per field its kept values (arrow strings), local ids 1..
        self.counts: np.ndarray | None = None  # training frequency per global id
        self.feature_map: FeatureMap | None = None
        # per field, the codes fitted on: (their names, each code's local id): transform looks nothing up again
        self._fitted: dict[str, tuple[pa.Array, np.ndarray]] = {}

    def fit(self, values: pd.DataFrame | ValueCodes, rows: slice = slice(None)) -> "FeatureEncoder":
        """Vocabularies of the ``rows`` of ``values`` (a text table, or its codes): per field the
        values seen at least ``min_count`` times, most frequent first, ties by value."""
        if isinstance(values, pd.DataFrame):
            values, rows = self._codes(values.iloc[rows]), slice(None)
        codes = values.codes[rows]
        if len(codes) == 0:
            raise DataError("cannot fit the feature encoder on an empty training split")
        infos, counts, offset = [], [np.zeros(1, dtype=np.int64)], 1
        for name in self.fields:
            k = _field_index(values, name)
            freq = np.bincount(codes[:, k], minlength=len(values.names[k]))
            kept = np.flatnonzero(freq >= self.min_count)
            # most frequent first; ties by value (code point order) so the vocabulary is deterministic
            kept = kept[np.argsort((freq.max() - freq[kept]) * len(freq) + values.rank(k)[kept])]  # one int64 key
            self.vocab[name] = values.names[k].take(kept)
            local = np.zeros(len(freq), dtype=np.int64)
            local[kept] = np.arange(1, len(kept) + 1)
            self._fitted[name] = (values.names[k], local)
            counts.append(np.concatenate([[freq.sum() - freq[kept].sum()], freq[kept]]).astype(np.int64))
            infos.append(FieldInfo(name, offset, len(kept) + 1))
            offset += len(kept) + 1
        self.counts = np.concatenate(counts)
        self.feature_map = FeatureMap(infos, offset, self.min_count, len(codes))
        return self

    def transform(self, values: pd.DataFrame | ValueCodes, out: RowFile | None = None,
                  chunk: int = 1 << 20) -> np.ndarray | None:
        """Rows -> ``(N, F)`` int32 global ids; unseen values get their field's OOV id. Values
        are read as text (:func:`~.table.text_codes`), each distinct value looked up once (not
        at all for the codes fitted on). With ``out`` the ids go there, ``chunk`` rows at a time."""
        if self.feature_map is None:
            raise RuntimeError("FeatureEncoder.transform called before fit")
        values = self._codes(values)
        tables = []  # per field: global id of each code
        for info in self.feature_map.fields:
            k = _field_index(values, info.name)
            names, local = self._fitted.get(info.name, (None, None))
            if names is not values.names[k]:  # unseen -> 0 (OOV)
                local = pc.fill_null(pc.index_in(values.names[k], value_set=self.vocab[info.name]), -1).to_numpy() + 1
            tables.append((k, (local + info.offset).astype(self.dtype)))
        result = None if out is not None else np.empty((len(values), len(self.fields)), dtype=self.dtype)
        for start in range(0, len(values), chunk):
            stop = min(start + chunk, len(values))
            block = np.empty((len(self.fields), stop - start), dtype=self.dtype)  # a field's ids contiguous
            for j, (k, table) in enumerate(tables):
                np.take(table, values.codes[start:stop, k], out=block[j])
            if out is None:
                result[start:stop] = block.T
            else:
                out.write(start, block.T)
        return result

    @property
    def dtype(self):
        assert self.feature_map is not None
        return np.int32 if self.feature_map.num_features < 2**31 else np.int64

    def _codes(self, values: pd.DataFrame | ValueCodes) -> ValueCodes:
        if isinstance(values, ValueCodes):
            return values
        missing = [name for name in self.fields if name not in values.columns]
        if missing:
            raise DataError(f"column {missing[0]!r} missing from the table being encoded")
        return ValueCodes.from_frame(values, self.fields)

    def save(self, folder: Path) -> None:
        """``feature_map.json`` (layout) and ``vocab.parquet`` (field, value, id, count)."""
        assert self.feature_map is not None and self.counts is not None
        self.feature_map.save(folder / "feature_map.json")
        infos = self.feature_map.fields
        field = np.repeat(np.arange(len(infos), dtype=np.int32), [f.size for f in infos])
        oov = pa.array(["<OOV>"], pa.large_string())
        ids = np.arange(1, self.feature_map.num_features)
        table = pa.table({
            "field": pa.DictionaryArray.from_arrays(field, [f.name for f in infos]).cast(pa.string()),
            "value": pa.concat_arrays([a for f in infos for a in (oov, self.vocab[f.name].cast(pa.large_string()))]),
            "id": ids, "count": self.counts[ids]})
        with atomic_path(folder / "vocab.parquet") as tmp:
            pq.write_table(table, tmp, use_dictionary=["field"])  # values are distinct: no dictionary
        with atomic_path(folder / "counts.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, self.counts)

    @classmethod
    def load(cls, folder: Path) -> "FeatureEncoder":
        fmap = FeatureMap.load(folder / "feature_map.json")
        enc = cls(fmap.field_names, fmap.min_count)
        vocab = pq.read_table(folder / "vocab.parquet").sort_by("id")
        value = vocab.column("value").combine_chunks().cast(pa.large_string())
        for info in fmap.fields:  # ids are contiguous per field: its OOV slot, then its values
            enc.vocab[info.name] = value.slice(info.offset, info.size - 1)
        enc.counts = np.load(folder / "counts.npy")
        enc.feature_map = fmap
        return enc


def _field_index(values: ValueCodes, name: str) -> int:
    if name not in values.fields:
        raise DataError(f"column {name!r} missing from the table being encoded")
    return values.fields.index(name)
