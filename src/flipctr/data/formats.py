"""Columnar file formats read with arrow: JSON lines, CSV and Parquet columns as categorical
text (codes, never a Python string per row), a file parsed a block at a time with the next block
parsed in a thread, order columns as sortable keys. The dataset readers (:mod:`.readers`) are
built on these."""

from __future__ import annotations

import gzip
import json
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pj
import pyarrow.parquet as pq

from .errors import DataError
from .table import PartitionedCodes, as_categorical, text_codes


def json_lines(path: Path, keys: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (gzipped or not), parsed one by one in Python (for objects
    whose keys vary, which an arrow schema cannot name); with ``keys`` only those keys of each
    record are kept (None where missing)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {i + 1} is not valid JSON ({err.msg})") from err
                out.append(record if keys is None else {k: record.get(k) for k in keys})
    return out


JSON_BLOCK_BYTES = 16 << 20  # a JSON-lines file is parsed this many bytes at a time


def json_blocks(path: Path, keys: dict[str, Any], expected: str = ""):
    """Record batches of the ``keys`` (name -> arrow type) of a JSON-lines file's records (gzipped
    or not), parsed by arrow a block at a time, the next in a thread: a missing key is null, other
    keys (the UCSD records carry large ones: shelves, descriptions, reviews) are never built."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    schema = pa.schema(list(keys.items()))
    try:
        with (pa.input_stream(path, compression="gzip" if path.suffix == ".gz" else None) as stream,
              pj.open_json(stream, read_options=pj.ReadOptions(block_size=JSON_BLOCK_BYTES),
                           parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
              as reader):
            yield from prefetched(reader)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not JSON lines {expected or f'whose {list(keys)} are typed'} as in the UCSD files "
                        f"({err})") from err


def json_table(path: Path, keys: dict[str, Any]) -> Any:
    """The ``keys`` of a JSON-lines file's records as one arrow table (:func:`json_blocks`)."""
    return pa.Table.from_batches(list(json_blocks(path, keys)), pa.schema(list(keys.items())))


def field_values(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Each field's values as text (``{field: column}``), missing ones "unknown": how custom data
    (and rows scored by ``flipctr predict``) become a table's values. Categorical columns: each
    DISTINCT value is turned into text once, and a row holds a code (millions of rows, few
    distinct values, no string per row)."""
    return pd.DataFrame({name: as_text(frame[col]) for name, col in columns.items()}, copy=False)


def as_text(column: pd.Series, unknown: tuple[str, ...] = ()) -> pd.Series:
    """A column as categorical text (:func:`~.table.text_codes`). Categorical text with no missing
    value is kept as it is: that some category may be used by no row is for
    :class:`~.table.ValueCodes` to settle, once, when the table is prepared."""
    if not unknown and _is_complete_text(column):
        return column
    return pd.Series(as_categorical(*text_codes(column, unknown)), index=column.index)


def _is_complete_text(column: pd.Series) -> bool:
    """Categorical, string categories, a value in every row."""
    return (isinstance(column.dtype, pd.CategoricalDtype) and pd.api.types.is_string_dtype(column.cat.categories)
            and (len(column) == 0 or column.cat.codes.min() >= 0))


LARGE_DICTIONARY_BYTES = 64 << 10  # a row group's dictionary page of a high-cardinality text column


def read_parquet_columns(path: Path, columns: list[str], categorical: list[str]) -> pd.DataFrame:
    """The named columns of a Parquet file, a column per task (one per core); the ``categorical``
    ones that hold text read as categoricals, no Python string per row: from the row groups'
    dictionaries, merged (:func:`dictionary_column`), or, where there are several large ones
    (a high-cardinality column), by encoding its rows a row group at a time
    (:class:`~.table.PartitionedCodes`)."""
    schema = pq.read_schema(path)
    meta = pq.ParquetFile(path).metadata
    chunks = {name: [meta.row_group(g).column(j) for g in range(meta.num_row_groups)]
              for j, name in enumerate(meta.schema.names)}

    def read(name: str):
        kind = schema.field(name).type
        if name not in categorical or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            return pq.read_table(path, columns=[name]).column(0).to_pandas()
        dictionary_bytes = [c.data_page_offset - c.dictionary_page_offset for c in chunks.get(name, [])
                            if c.has_dictionary_page and c.dictionary_page_offset is not None]
        if len(dictionary_bytes) > 1 and max(dictionary_bytes) >= LARGE_DICTIONARY_BYTES:
            # many large row-group dictionaries: encoding the rows costs less than merging them
            parts, file = PartitionedCodes(), pq.ParquetFile(path)
            for group in range(file.num_row_groups):  # a row group's text at a time
                for chunk in file.read_row_group(group, columns=[name]).column(0).chunks:
                    parts.add(chunk)
            return as_categorical(*parts.finish())
        return dictionary_column(pq.read_table(path, columns=[name], read_dictionary=[name]).column(0))

    names = [c for c in dict.fromkeys(columns) if c in schema.names]
    largest_first = sorted(names, key=lambda c: -sum(chunk.total_compressed_size for chunk in chunks.get(c, [])))
    with ThreadPoolExecutor(min(len(names), os.cpu_count() or 1) or 1) as pool:  # arrow and numpy release the GIL
        read_columns = dict(zip(largest_first, pool.map(read, largest_first), strict=True))
    return pd.DataFrame({c: read_columns[c] for c in names}, copy=False)


CSV_BLOCK_BYTES = 16 << 20  # a custom CSV is parsed this many bytes at a time
HIGH_CARDINALITY = 1 / 8  # a column read in blocks whose first block has more distinct values per row is encoded in partitions


class TextColumn:
    """One categorical column of a file read in blocks (CSV, JSON lines), added in order: each block dictionary-encoded
    (merged at the end by :func:`dictionary_column`), or, when the first block shows a
    high-cardinality column, every row encoded in partitions (:class:`~.table.PartitionedCodes`)."""

    def __init__(self) -> None:
        self.blocks: list = []
        self.partitioned: PartitionedCodes | None = None

    def add(self, column) -> None:
        if self.partitioned is not None:
            return self.partitioned.add(column)
        encoded = pc.dictionary_encode(column)
        if not self.blocks and len(encoded.dictionary) > HIGH_CARDINALITY * len(column):
            self.partitioned = PartitionedCodes()
            return self.partitioned.add(column)
        self.blocks.append(encoded)

    def finish(self) -> pd.Categorical:
        if self.partitioned is not None:
            return as_categorical(*self.partitioned.finish())
        return dictionary_column(pa.chunked_array(self.blocks, pa.dictionary(pa.int32(), pa.string())))


def prefetched(batches, depth: int = 2):
    """The items of ``batches`` (an arrow reader, which parses on one core), the next ``depth``
    parsed in a thread while these are used; its error raised here."""
    items: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(end)
        except BaseException as err:  # handed to the consumer
            put(err)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def read_csv_columns(path: Path, sep: str, columns: list[str], categorical: list[str]) -> pd.DataFrame:
    """The named columns of a CSV file, as text (empty -> missing), read a block at a time (the
    next parsed while this one is used), the columns of a block encoded one per core; the
    ``categorical`` ones as codes (:class:`TextColumn`), never a string per row."""
    parse = pcsv.ParseOptions(delimiter=sep, newlines_in_values=True)
    try:
        with pcsv.open_csv(path, parse_options=parse) as head:
            header = head.schema.names
        present = [c for c in dict.fromkeys(columns) if c in header]
        convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in header}, include_columns=present,
                                      strings_can_be_null=True, null_values=[""])
        text = {c: TextColumn() for c in present if c in categorical}
        plain: dict[str, list] = {c: [] for c in present if c not in categorical}
        with (pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES), parse_options=parse,
                            convert_options=convert) as reader,
              ThreadPoolExecutor(min(len(text), os.cpu_count() or 1) or 1) as pool):
            for batch in prefetched(reader):
                for c in plain:
                    plain[c].append(batch.column(c))
                list(pool.map(lambda c: text[c].add(batch.column(c)), text))  # arrow releases the GIL
            out = dict(zip(text, pool.map(TextColumn.finish, text.values())))
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a {sep!r}-separated CSV with a header line ({err})") from err
    out.update({c: pa.chunked_array(parts, pa.string()).to_pandas() for c, parts in plain.items()})
    return pd.DataFrame({c: out[c] for c in present}, copy=False)


def dictionary_column(column) -> pd.Categorical:
    """A dictionary-encoded arrow column as one categorical. Each row group has its own
    dictionary (shared by its batches): the distinct dictionaries are put end to end and
    encoded in one pass, which gives every entry its code in the merged categories."""
    dictionaries: list = []
    starts, parts = [], []
    for chunk in column.chunks:
        if not dictionaries or not chunk.dictionary.equals(dictionaries[-1]):
            starts.append(sum(len(d) for d in dictionaries))
            dictionaries.append(chunk.dictionary)
        parts.append((starts[-1], pc.fill_null(chunk.indices, -1).to_numpy()))
    # large_string: the dictionaries together may pass 2 GiB of text
    merged = pc.dictionary_encode(pa.concat_arrays([d.cast(pa.large_string()) for d in dictionaries])
                                  if dictionaries else pa.array([], pa.large_string()))
    code_of = merged.indices.to_numpy().astype(np.int32)
    codes = np.concatenate([np.where(local >= 0, code_of[start + local], -1) for start, local in parts]
                           or [np.zeros(0, np.int32)]).astype(np.int32)
    return as_categorical(codes, merged.dictionary)


def order_key(column: pd.Series, source: str) -> np.ndarray:
    """A sortable key of an order column: numbers (epoch seconds or milliseconds, any count), or
    dates and times, native (Parquet) or as ISO 8601 text (``2023-01-05``, ``2023-01-05 12:00:00``,
    ``2023-01-05T12:00:00Z``). A value that is none of these is an error naming its row: rows are
    never silently left in file order."""
    if pd.api.types.is_datetime64_any_dtype(column):
        parsed = column
    else:
        parsed = pd.to_numeric(column, errors="coerce")
        if parsed.isna().any() and not pd.api.types.is_numeric_dtype(column):
            as_time = pd.to_datetime(column, errors="coerce", format="ISO8601", utc=True)
            if as_time.notna().sum() > parsed.notna().sum():  # the column holds dates, not numbers
                parsed = as_time
    if parsed.isna().any():
        row = int(np.argmax(parsed.isna().to_numpy()))
        raise DataError(f"{source}, row {row + 1}: {column.iloc[row]!r} is empty or neither a number "
                        "nor an ISO 8601 date/time")
    if pd.api.types.is_datetime64_any_dtype(parsed):
        return parsed.astype("int64").to_numpy()  # ns since the epoch
    if pd.api.types.is_integer_dtype(parsed):
        return parsed.to_numpy(dtype=np.int64)  # as float64, nanosecond stamps would tie
    return parsed.to_numpy(dtype=np.float64)
