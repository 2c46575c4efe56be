"""The one in-memory form every reader produces and every later stage consumes."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import DataError, cache_file


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


def _is_text(categories: pd.Index, codes: np.ndarray) -> bool:
    return pd.api.types.is_string_dtype(categories) and (
        codes.size == 0 or (codes.min() >= 0 and bool(np.bincount(codes, minlength=len(categories)).all())))


def text_codes(column: pd.Series, unknown: tuple[str, ...] = ()) -> tuple[np.ndarray, pa.Array]:
    """A column as ``(codes (N,) int32, names)``: each row's value as text (``str`` of it; values
    that print alike, 1 and "1", are one), missing values and those in ``unknown`` "unknown",
    names (an arrow string array, distinct) holding only values some row has. Each DISTINCT
    value is turned into text once: the cost is one pass over the codes plus one over the
    categories (none when they are text already, distinct and used)."""
    column = column if isinstance(column.dtype, pd.CategoricalDtype) else column.astype("category")
    categories, codes = column.cat.categories, column.cat.codes.to_numpy()
    if not unknown and _is_text(categories, codes):
        return codes.astype(np.int32, copy=False), pa.array(categories, pa.large_string())
    text = np.append(categories.astype(str).to_numpy(dtype=object), "unknown")
    if unknown:
        text[np.isin(text, list(unknown))] = "unknown"
    codes = codes.astype(np.int32)
    codes[codes < 0] = len(text) - 1  # missing -> the "unknown" appended last
    used = np.flatnonzero(np.bincount(codes, minlength=len(text)))
    inverse, names = pd.factorize(text[used])  # first appearance order; equal texts merged
    remap = np.zeros(len(text), dtype=np.int32)
    remap[used] = inverse
    return remap[codes], pa.array(np.asarray(names, dtype=object), pa.large_string())


def as_categorical(codes: np.ndarray, names: pa.Array) -> pd.Categorical:
    """Codes into distinct text ``names`` as a categorical (its categories held by arrow)."""
    categories = pd.Index(pd.array(names.cast(pa.large_string()), dtype=pd.StringDtype("pyarrow")))
    return pd.Categorical.from_codes(codes, categories=categories, validate=False)


@dataclass
class ValueCodes:
    """Every row's value of every field as a code into that field's distinct values: the text
    table in the form the encoders and the text cache read, without a string per row.

    ``codes`` is ``(N, F)`` int32, column-major (a field's codes are contiguous, and so is each
    field's part of a range of rows); ``names[j]`` holds field ``j``'s distinct values (arrow
    strings), in code order, each used by some row.
    """

    fields: list[str]
    codes: np.ndarray
    names: list[pa.Array]

    CODES_FILE = "value_codes.npy"
    NAMES_FILE = "value_names.parquet"

    def __post_init__(self) -> None:
        self._ranks: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.codes)

    @classmethod
    def from_frame(cls, values: pd.DataFrame, fields: list[str]) -> "ValueCodes":
        """The fields of a text table (columns of any type, as :func:`text_codes` reads them)."""
        codes = np.empty((len(values), len(fields)), dtype=np.int32, order="F")

        def field(j: int) -> pa.Array:
            codes[:, j], names = text_codes(values[fields[j]])
            return names

        with ThreadPoolExecutor(min(len(fields), os.cpu_count() or 1) or 1) as pool:  # numpy and arrow release the GIL
            names = list(pool.map(field, range(len(fields))))
        return cls(list(fields), codes, names)

    def frame(self) -> pd.DataFrame:
        """The text table: one categorical column per field."""
        return pd.DataFrame({name: as_categorical(np.asarray(self.codes[:, j]), self.names[j])
                             for j, name in enumerate(self.fields)})

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The codes of rows ``[start, stop)``, ``(n, F)`` in memory."""
        return np.ascontiguousarray(self.codes[start:stop])

    def rank(self, field: int) -> np.ndarray:
        """Each code's position when field ``field``'s names are sorted (code point order)."""
        if field not in self._ranks:
            rank = np.empty(len(self.names[field]), dtype=np.int64)
            rank[pc.sort_indices(self.names[field]).to_numpy()] = np.arange(len(rank))
            self._ranks[field] = rank
        return self._ranks[field]

    def save(self, folder: Path) -> None:
        np.save(folder / self.CODES_FILE, self.codes)  # keeps the column-major layout
        field = np.repeat(np.arange(len(self.fields), dtype=np.int32), [len(n) for n in self.names])
        value = pa.concat_arrays([n.cast(pa.large_string()) for n in self.names]) if self.names else pa.array([], pa.large_string())
        table = pa.table({"field": field, "value": value})
        pq.write_table(table.replace_schema_metadata({"fields": json.dumps(self.fields)}), folder / self.NAMES_FILE,
                       use_dictionary=["field"])  # values are distinct: no dictionary

    @classmethod
    def load(cls, folder: Path) -> "ValueCodes":
        """Codes memory-mapped, names read (a damaged file of the cache ``folder``: one DataError)."""
        with cache_file(folder / cls.NAMES_FILE, folder) as path:
            table = pq.read_table(path)
            fields = json.loads(table.schema.metadata[b"fields"])
        value = table.column("value").combine_chunks().cast(pa.large_string())
        bounds = np.searchsorted(table.column("field").to_numpy(), np.arange(len(fields) + 1))
        with cache_file(folder / cls.CODES_FILE, folder) as path:
            codes = np.load(path, mmap_mode="r")
        return cls(fields, codes, [value.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])])


class RowFile:
    """A ``.npy`` array on disk, written and read a chunk of rows at a time (reads through a
    memory map opened for that chunk alone): pages of other chunks do not stay in the process, so
    its memory is a chunk's, whatever the rows."""

    def __init__(self, path: Path):
        self.path = path
        mapped = np.load(path, mmap_mode="r")
        self._header, self._dtype, self._shape = mapped.offset, mapped.dtype, mapped.shape
        del mapped

    @classmethod
    def create(cls, path: Path, dtype, shape: tuple[int, ...]) -> "RowFile":
        np.lib.format.open_memmap(path, "w+", dtype, shape).flush()  # sized, not written
        return cls(path)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Rows ``[start, start + len(rows))``: written into the file in place (no memory map,
        whose flush would wait for the disk)."""
        if rows.shape[1:] != self._shape[1:] or not 0 <= start <= self._shape[0] - len(rows):
            raise ValueError(f"{self.path}: rows {rows.shape} at {start} do not fit {self._shape}")
        row_bytes = self._dtype.itemsize * int(np.prod(self._shape[1:], dtype=np.int64))
        with open(self.path, "r+b") as fh:
            fh.seek(self._header + start * row_bytes)
            np.ascontiguousarray(rows, dtype=self._dtype).tofile(fh)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.take(slice(start, stop))

    def take(self, index: slice | np.ndarray) -> np.ndarray:
        mapped = np.load(self.path, mmap_mode="r")
        out = np.array(mapped[index])
        del mapped
        return out


class PartitionedCodes:
    """Codes of a high-cardinality text column that arrives in chunks (``add`` each, then
    ``finish``), without one hash table over all its distinct values.

    Looking every row up in a table of millions of values misses the CPU cache on nearly every
    row. Instead each chunk's rows are split by a hash of a few of their bytes (length, first and
    last two) into ``2**bits`` partitions; equal values always share one, so each partition is
    dictionary-encoded alone, its table small enough to stay in cache; the partitions' distinct
    values, put in the order of their first rows, are the column's, and every row's code is the
    one a single hash table would give. Missing values get code -1.
    """

    def __init__(self, bits: int = 6):
        self.bits = bits
        self._pieces: list[list[pa.Array]] = [[] for _ in range(1 << bits)]
        self._rows: list[list[np.ndarray]] = [[] for _ in range(1 << bits)]  # each piece's row numbers
        self._seen = 0
        self._type = pa.string()

    def add(self, chunk: pa.Array) -> None:
        """The next rows (an arrow string or large_string array)."""
        self._type = chunk.type
        key = self._partition(chunk)
        order = np.argsort(key, kind="stable")  # a radix sort of small integers
        bounds = np.concatenate([[0], np.cumsum(np.bincount(key, minlength=len(self._pieces)))])
        taken = chunk.take(pa.array(order))
        for part, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            if stop > start:
                self._pieces[part].append(taken.slice(start, stop - start))
                self._rows[part].append(order[start:stop] + self._seen)
        self._seen += len(chunk)

    def finish(self) -> tuple[np.ndarray, pa.Array]:
        """``(codes (rows,) int32, names)``: the names distinct, in the order of their first row
        (the codes one hash table over all rows would give)."""
        local_codes, first_rows, names = [], [], []
        for part, pieces in enumerate(self._pieces):
            if not pieces:
                continue
            encoded = pc.dictionary_encode(pa.chunked_array(pieces, self._type))  # one dictionary for all chunks
            local = np.concatenate([pc.fill_null(c.indices, -1).to_numpy() for c in encoded.chunks]).astype(np.int32)
            rows = np.concatenate(self._rows[part])  # increasing
            # a partition's codes are numbered as they first appear: a row holds a new one where it passes all before it
            seen = np.maximum.accumulate(local)
            first_rows.append(rows[local > np.concatenate([[-1], seen[:-1]])])
            local_codes.append((rows, local, sum(len(n) for n in names)))
            names.append(encoded.chunk(encoded.num_chunks - 1).dictionary.cast(pa.large_string()))
            self._pieces[part], self._rows[part] = [], []
        if not names:
            return np.full(self._seen, -1, dtype=np.int32), pa.array([], pa.large_string())
        order = np.argsort(np.concatenate(first_rows))
        code_of = np.empty(len(order), dtype=np.int32)
        code_of[order] = np.arange(len(order), dtype=np.int32)
        codes = np.empty(self._seen, dtype=np.int32)
        for rows, local, start in local_codes:
            codes[rows] = np.where(local >= 0, code_of[start + np.maximum(local, 0)], -1)
        return codes, pa.concat_arrays(names).take(pa.array(order))

    def _partition(self, chunk: pa.Array) -> np.ndarray:
        """Each row's partition, a function of its value alone."""
        offset_type = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], dtype=offset_type)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = chunk.buffers()[2]
        data = np.frombuffer(data, dtype=np.uint8) if data is not None and data.size else np.zeros(1, np.uint8)
        start, end = offsets[:-1], offsets[1:]
        length = (end - start).astype(np.uint32)
        h = length * np.uint32(0x9E3779B1)
        for at, shortest, factor in ((start, 1, 0x85EBCA77), (end - 1, 1, 0xC2B2AE3D), (end - 2, 2, 0x27D4EB2F)):
            byte = data[np.clip(at, 0, len(data) - 1)].astype(np.uint32)
            byte[length < shortest] = 0  # a short value's bytes are not read from its neighbour
            h ^= byte * np.uint32(factor)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x2C1B3C6D)
        return (h >> np.uint32(32 - self.bits)).astype(np.uint16)
