"""Readers: raw files of one dataset -> :class:`Table` (named text fields, label, order).

Values are the words a person would use ("25-34", "college/grad student", "female"), since
the same table feeds the ID encoder and the text prompts.
"""

from __future__ import annotations

import gzip
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml

from .errors import DataError
from .table import PartitionedCodes, Table, as_categorical, text_codes

ML1M_AGE = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49",
            "50": "50-55", "56": "56+"}
ML1M_OCCUPATION = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
]
ML1M_GENDER = {"F": "female", "M": "male"}

ML1M_FIELDS = ["user ID", "gender", "age", "occupation", "zip code", "movie ID", "title", "genre"]
BX_FIELDS = ["user ID", "location", "age", "ISBN", "book title", "author", "publication year",
             "publisher"]
# Each dataset's two sides, for models that encode them apart (MoRec: the item's text as a field;
# CTR-BERT: a user tower and an item tower): the side's key field and the fields describing it.
SIDES = {"ml-1m": {"user": ("user ID", ["gender", "age", "occupation", "zip code"]),
                   "item": ("movie ID", ["title", "genre"])},
         "bookcrossing": {"user": ("user ID", ["location", "age"]),
                          "item": ("ISBN", ["book title", "author", "publication year", "publisher"])},
         "goodreads": {"user": ("user ID", []),
                       "item": ("book ID", ["book title", "book genres", "author name", "publisher",
                                            "publication year"])}}


def side_fields(dataset: str, sides: dict[str, bool], who: str = "this model") -> dict[str, tuple[str, list[str]]]:
    """Per side asked for (``{"user": with_key, ...}``): its key field (the user, the item) and
    the fields its text is made of (the key among them when ``with_key``)."""
    out = {}
    for side, with_key in sides.items():
        if dataset not in SIDES:
            raise ValueError(f"{dataset}: no user and item fields known for {who} (known: {sorted(SIDES)})")
        key, fields = SIDES[dataset][side]
        out[side] = (key, [key, *fields] if with_key else list(fields))
    return out


GOODREADS_FIELDS = ["user ID", "book ID", "book title", "book genres", "average rating",
                    "number of reviews", "author ID", "author name", "number of pages",
                    "ebook flag", "format", "publisher", "publication year", "work ID",
                    "media type"]


def _read_dat(path: Path, names: list[str]) -> pd.DataFrame:
    """Read a GroupLens ``::``-separated latin-1 file as strings."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    text = path.read_bytes().decode("latin-1")
    if text and "::" not in text.split("\n", 1)[0]:
        raise DataError(f"{path}: line 1 is not '::'-separated (expected {'::'.join(names)})")
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    parts = [line.split("::") for line in lines]
    for i, p in enumerate(parts):
        if len(p) != len(names):
            raise DataError(
                f"{path}: line {i + 1} has {len(p)} '::'-separated columns, expected "
                f"{len(names)} ({'::'.join(names)}); the file is truncated or malformed"
            )
    frame = pd.DataFrame(parts, columns=names)
    return frame


def _to_int(series: pd.Series, path: Path, column: str) -> np.ndarray:
    values = pd.to_numeric(series, errors="coerce")
    if values.isna().any():
        row = int(np.argmax(values.isna().to_numpy()))
        raise DataError(f"{path}: line {row + 1}, column {column!r}: {series.iloc[row]!r} is not an integer")
    return values.to_numpy(dtype=np.int64)


def read_movielens_1m(folder: str | Path) -> Table:
    """MovieLens-1M: rating>3 -> 1, <3 -> 0, ==3 dropped; time keys (timestamp, user, movie)."""
    folder = Path(folder)
    ratings = _read_dat(folder / "ratings.dat", ["user", "movie", "rating", "timestamp"])
    users = _read_dat(folder / "users.dat", ["user", "gender", "age", "occupation", "zip"])
    movies = _read_dat(folder / "movies.dat", ["movie", "title", "genres"])
    rating = _to_int(ratings["rating"], folder / "ratings.dat", "rating")
    stamp = _to_int(ratings["timestamp"], folder / "ratings.dat", "timestamp")

    occupation = _to_int(users["occupation"], folder / "users.dat", "occupation")
    if occupation.min() < 0 or occupation.max() >= len(ML1M_OCCUPATION):
        raise DataError(f"{folder / 'users.dat'}: occupation codes must be 0..20")
    users = users.assign(
        gender=users["gender"].map(ML1M_GENDER), age=users["age"].map(ML1M_AGE),
        occupation=np.asarray(ML1M_OCCUPATION, dtype=object)[occupation],
    )
    for col in ("gender", "age"):
        if users[col].isna().any():
            row = int(np.argmax(users[col].isna().to_numpy()))
            raise DataError(f"{folder / 'users.dat'}: line {row + 1}: unknown {col} code")
    movies = movies.assign(genre=movies["genres"].str.split("|").str[0])

    keep = rating != 3
    frame = ratings.loc[keep, ["user", "movie"]].reset_index(drop=True)
    labels = (rating[keep] > 3).astype(np.int8)
    stamp = stamp[keep]
    frame = frame.merge(users, on="user", how="left", validate="many_to_one")
    frame = frame.merge(movies, on="movie", how="left", validate="many_to_one")
    for col, src in (("gender", "users.dat"), ("title", "movies.dat")):
        if frame[col].isna().any():
            row = int(np.argmax(frame[col].isna().to_numpy()))
            raise DataError(f"{folder / 'ratings.dat'}: rating {row + 1} names an id missing from {src}")
    values = pd.DataFrame({
        "user ID": frame["user"], "gender": frame["gender"], "age": frame["age"],
        "occupation": frame["occupation"], "zip code": frame["zip"], "movie ID": frame["movie"],
        "title": frame["title"], "genre": frame["genre"],
    })
    # ties in time broken by user, then movie (numeric ids), so the order never depends on the file's
    time = pd.DataFrame({"timestamp": stamp,
                         "user ID": _to_int(frame["user"], folder / "ratings.dat", "user"),
                         "movie ID": _to_int(frame["movie"], folder / "ratings.dat", "movie")})
    return Table("ml-1m", list(ML1M_FIELDS), values, labels, time)


def _read_bx_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """A BX-CSV-Dump file: ``;``-separated, every field quoted, quotes inside escaped with ``\\``."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, sep=";", encoding="latin-1", dtype=str, escapechar="\\",
                            keep_default_na=False, quotechar='"')
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a ';'-separated quoted CSV ({err})") from err
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: header lacks columns {missing} (found {list(frame.columns)}); "
            "expected a ';'-separated BX CSV"
        )
    return frame


_BX_COUNTRY_ALIASES = {"Us": "USA", "U.S.A": "USA", "U.S": "USA", "United States": "USA",
                       "United States Of America": "USA", "Uk": "UK", "U.K": "UK"}


def bx_country(location: pd.Series) -> pd.Series:
    """``"city, state, country"`` -> ``"Country"``: what follows the second comma (a fourth part,
    where there is one, stays with it), without stray spaces, quotes, commas and full stops at
    either end, title-cased, common spellings of USA and UK merged; empty or ``n/a`` ->
    ``"unknown"``.

    What follows the second comma, merely stripped of spaces, has exactly the paper's 425
    distinct values over all samples; the clean-ups here leave fewer (README). The last
    comma-separated part alone has 261.
    """
    rest = location.str.split(",", n=2).str[2].fillna("").str.strip(" ,.\"'")
    country = rest.str.title().replace(_BX_COUNTRY_ALIASES).str.replace(r"\bUsa\b", "USA", regex=True)
    return country.mask(rest.str.lower().isin(["", "n/a"]), "unknown")


BX_AGE_BUCKETS = [(18, "under 18"), (25, "18-24"), (30, "25-29"), (35, "30-34"), (40, "35-39"),
                  (45, "40-44"), (50, "45-49"), (55, "50-54"), (60, "55-59"), (101, "60+")]


def bx_age(age: pd.Series, low: int = 5, high: int = 100) -> pd.Series:
    """Age in 11 buckets: ``unknown`` (missing, or outside ``low..high``), under 18, 18-24,
    25-29, ..., 55-59, 60+."""
    numeric = pd.to_numeric(age, errors="coerce")
    bins = [low, *[upper for upper, _ in BX_AGE_BUCKETS[:-1]], high + 1]
    bucket = pd.cut(numeric, bins=bins, right=False, labels=[name for _, name in BX_AGE_BUCKETS])
    return bucket.astype(object).where(bucket.notna(), "unknown")


def read_bookcrossing(folder: str | Path) -> Table:
    """BookCrossing: every rating (implicit 0s included) whose ISBN is in BX-Books and whose
    user is in BX-Users; rating > 5 -> 1 else 0; file order, no timestamps.

    ISBNs not made of letters and digits only are dropped (four ratings name such garbled
    ISBNs, e.g. ``3518365479<90``); the rest is 1,031,171 samples, the paper's Table 1 count.
    """
    folder = Path(folder)
    rpath, bpath, upath = (folder / f for f in ("BX-Book-Ratings.csv", "BX-Books.csv", "BX-Users.csv"))
    ratings = _read_bx_csv(rpath, ["User-ID", "ISBN", "Book-Rating"])
    books = _read_bx_csv(bpath, ["ISBN", "Book-Title", "Book-Author", "Year-Of-Publication", "Publisher"])
    users = _read_bx_csv(upath, ["User-ID", "Location", "Age"])
    rating = _to_int(ratings["Book-Rating"].replace("", np.nan), rpath, "Book-Rating")
    ratings = ratings.assign(label=(rating > 5).astype(np.int8))
    books = books[books["ISBN"].str.fullmatch(r"[A-Za-z0-9]+")].drop_duplicates("ISBN")
    year = books["Year-Of-Publication"].str.strip()
    books = books.assign(year=year.where(year.str.fullmatch(r"[0-9]{4}"), "unknown"),
                         publisher=books["Publisher"].mask(books["Publisher"].str.strip().str.lower() == "n/a",
                                                           "unknown"))
    users = users.drop_duplicates("User-ID").assign(
        location=lambda u: bx_country(u["Location"]), age=lambda u: bx_age(u["Age"]))
    frame = ratings.merge(books, on="ISBN", how="inner", sort=False)
    frame = frame.merge(users[["User-ID", "location", "age"]], on="User-ID", how="inner", sort=False)
    values = pd.DataFrame({
        "user ID": frame["User-ID"], "location": frame["location"], "age": frame["age"],
        "ISBN": frame["ISBN"], "book title": frame["Book-Title"], "author": frame["Book-Author"],
        "publication year": frame["year"], "publisher": frame["publisher"],
    })
    values = values.replace("", "unknown")
    return Table("bookcrossing", list(BX_FIELDS), values, frame["label"].to_numpy(np.int8))


def _json_lines(path: Path, keys: list[str] | None = None) -> list[dict[str, Any]]:
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


def _json_blocks(path: Path, keys: dict[str, Any], expected: str = ""):
    """Record batches of the ``keys`` (name -> arrow type) of a JSON-lines file's records (gzipped
    or not), parsed by arrow a block at a time, the next in a thread: a missing key is null, other
    keys (the UCSD records carry large ones: shelves, descriptions, reviews) are never built."""
    import pyarrow as pa
    import pyarrow.json as pj

    if not path.exists():
        raise DataError(f"{path}: file not found")
    schema = pa.schema(list(keys.items()))
    try:
        with (pa.input_stream(path, compression="gzip" if path.suffix == ".gz" else None) as stream,
              pj.open_json(stream, read_options=pj.ReadOptions(block_size=JSON_BLOCK_BYTES),
                           parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
              as reader):
            yield from _prefetched(reader)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not JSON lines {expected or f'whose {list(keys)} are typed'} as in the UCSD files "
                        f"({err})") from err


def _json_table(path: Path, keys: dict[str, Any]) -> Any:
    """The ``keys`` of a JSON-lines file's records as one arrow table (:func:`_json_blocks`)."""
    import pyarrow as pa

    return pa.Table.from_batches(list(_json_blocks(path, keys)), pa.schema(list(keys.items())))


GOODREADS_DATE = "%a %b %d %H:%M:%S %z %Y"


def _goodreads_interactions(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Rated interactions (rating 1..5): ``(user_id and book_id as categoricals + rating, date_added
    as int64 ns)``, parsed by arrow a block at a time (the next in a thread): only these four keys
    of the (large) interaction records are read, ids as in the UCSD files (JSON strings), dates
    parsed per block, and a row holds codes, not strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = {"user_id": pa.string(), "book_id": pa.string(), "rating": pa.float64(), "date_added": pa.string()}
    ids = {"user_id": _TextColumn(), "book_id": _TextColumn()}
    ratings, stamps, seen = [], [], 0
    for batch in _json_blocks(path, keys, expected="with string ids"):
        missing = [k for k in keys if batch.num_rows and batch.column(k).null_count == batch.num_rows]
        if missing:
            raise DataError(f"{path}: records lack keys {missing}")
        rating = batch.column("rating")
        rated = pc.fill_null(pc.and_(pc.greater_equal(rating, 1), pc.less_equal(rating, 5)), False)
        rows = batch.filter(rated)
        stamp = pc.strptime(rows.column("date_added"), format=GOODREADS_DATE, unit="ns", error_is_null=True)
        if stamp.null_count:
            bad = int(np.flatnonzero(rated.to_numpy(zero_copy_only=False))[stamp.is_null().to_numpy(zero_copy_only=False).argmax()])
            raise DataError(f"{path}: record {seen + bad + 1} has an unreadable date_added")
        for key, column in ids.items():
            column.add(rows.column(key))
        ratings.append(rows.column("rating").to_numpy(zero_copy_only=False).astype(np.int8))
        stamps.append(stamp.cast(pa.int64()).to_numpy(zero_copy_only=False))
        seen += batch.num_rows
    if not stamps or not sum(map(len, stamps)):
        raise DataError(f"{path}: no rated interactions")
    inter = pd.DataFrame({key: column.finish() for key, column in ids.items()}, copy=False)
    inter["rating"] = np.concatenate(ratings)
    return inter, np.concatenate(stamps)


def read_goodreads(folder: str | Path) -> Table:
    """GoodReads (UCSD Book Graph JSON lines): rating 1..5 kept, >3 -> 1 else 0; time key date_added.

    Rating 0 means "shelved, not rated" in the UCSD files and is not a sample. The books' files
    are read for the keys the fields use; each interaction takes its book's attributes as codes
    into one table of books (no string per row).
    """
    folder = Path(folder)
    inter, stamp = _goodreads_interactions(folder / "goodreads_interactions.json.gz")
    labels = (inter["rating"].to_numpy() > 3).astype(np.int8)

    import pyarrow as pa
    import pyarrow.compute as pc

    text = pa.string()
    books = _json_table(folder / "goodreads_books.json.gz", {
        **dict.fromkeys(["book_id", "title", "average_rating", "text_reviews_count", "num_pages", "is_ebook", "format",
                         "publisher", "publication_year", "work_id"], text),
        "authors": pa.list_(pa.struct([("author_id", text)]))})
    listed = books.column("authors").combine_chunks()
    has_author = pc.fill_null(pc.greater(pc.list_value_length(listed), 0), False)
    first_author = pc.struct_field(pc.list_element(listed.filter(has_author), 0), "author_id")
    books = books.drop_columns(["authors"]).to_pandas()
    books["author_id"] = ""
    books.loc[has_author.to_numpy(zero_copy_only=False), "author_id"] = first_author.to_numpy(zero_copy_only=False)
    authors = _json_table(folder / "goodreads_book_authors.json.gz", {"author_id": text, "name": text}).to_pandas()
    # genres are objects of varying keys (genre -> count): read record by record
    genres = pd.DataFrame(_json_lines(folder / "goodreads_book_genres_initial.json.gz", ["book_id", "genres"]))
    genres["book genres"] = genres["genres"].map(
        lambda g: ", ".join(k for k, _ in sorted(g.items(), key=lambda kv: -kv[1])) if g else "")
    works = _json_table(folder / "goodreads_book_works.json.gz", {"work_id": text, "media_type": text}).to_pandas()
    books = (books.astype({"book_id": str}).drop_duplicates("book_id")
             .merge(authors.astype(str), on="author_id", how="left")
             .merge(genres[["book_id", "book genres"]].astype(str), on="book_id", how="left")
             .merge(works.astype(str), on="work_id", how="left"))
    books = books.fillna("unknown").astype(str).replace({"": "unknown", "nan": "unknown", "None": "unknown"})
    # each interaction's row in the books table; a book missing there gets the last row, all "unknown"
    books = pd.concat([books, pd.DataFrame({c: ["unknown"] for c in books.columns})], ignore_index=True)
    book_of = pd.Index(books["book_id"][:-1]).get_indexer(inter["book_id"].cat.categories)
    book_of[book_of < 0] = len(books) - 1
    codes = inter["book_id"].cat.codes.to_numpy()
    row_book = np.where(codes >= 0, book_of[codes], len(books) - 1)  # no book id: all "unknown"

    def attribute(column: str) -> pd.Categorical:
        per_book = pd.Categorical(books[column])
        return pd.Categorical.from_codes(per_book.codes[row_book], per_book.categories)

    columns = {"book title": "title", "book genres": "book genres",
               "average rating": "average_rating", "number of reviews": "text_reviews_count",
               "author ID": "author_id", "author name": "name", "number of pages": "num_pages",
               "ebook flag": "is_ebook", "format": "format", "publisher": "publisher",
               "publication year": "publication_year", "work ID": "work_id", "media type": "media_type"}
    values = pd.DataFrame({"user ID": _as_text(inter["user_id"], ("", "nan")),
                           # the interaction's own book id, listed in the books file or not
                           "book ID": _as_text(inter["book_id"], ("", "nan")),
                           **{name: attribute(col) for name, col in columns.items()}})
    time = pd.DataFrame({"date_added": stamp})
    return Table("goodreads", list(GOODREADS_FIELDS), values, labels, time)


def field_values(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Each field's values as text (``{field: column}``), missing ones "unknown": how custom data
    (and rows scored by ``flipctr predict``) become a table's values. Categorical columns: each
    DISTINCT value is turned into text once, and a row holds a code (millions of rows, few
    distinct values, no string per row)."""
    return pd.DataFrame({name: _as_text(frame[col]) for name, col in columns.items()}, copy=False)


def _as_text(column: pd.Series, unknown: tuple[str, ...] = ()) -> pd.Series:
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


def _read_parquet_columns(path: Path, columns: list[str], categorical: list[str]) -> pd.DataFrame:
    """The named columns of a Parquet file, a column per task (one per core); the ``categorical``
    ones that hold text read as categoricals, no Python string per row: from the row groups'
    dictionaries, merged (:func:`_dictionary_column`), or, where there are several large ones
    (a high-cardinality column), by encoding its rows a row group at a time
    (:class:`~.table.PartitionedCodes`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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
        return _dictionary_column(pq.read_table(path, columns=[name], read_dictionary=[name]).column(0))

    names = [c for c in dict.fromkeys(columns) if c in schema.names]
    largest_first = sorted(names, key=lambda c: -sum(chunk.total_compressed_size for chunk in chunks.get(c, [])))
    with ThreadPoolExecutor(min(len(names), os.cpu_count() or 1) or 1) as pool:  # arrow and numpy release the GIL
        read_columns = dict(zip(largest_first, pool.map(read, largest_first), strict=True))
    return pd.DataFrame({c: read_columns[c] for c in names}, copy=False)


CSV_BLOCK_BYTES = 16 << 20  # a custom CSV is parsed this many bytes at a time
HIGH_CARDINALITY = 1 / 8  # a column read in blocks whose first block has more distinct values per row is encoded in partitions


class _TextColumn:
    """One categorical column of a file read in blocks (CSV, JSON lines), added in order: each block dictionary-encoded
    (merged at the end by :func:`_dictionary_column`), or, when the first block shows a
    high-cardinality column, every row encoded in partitions (:class:`~.table.PartitionedCodes`)."""

    def __init__(self) -> None:
        self.blocks: list = []
        self.partitioned: PartitionedCodes | None = None

    def add(self, column) -> None:
        import pyarrow.compute as pc

        if self.partitioned is not None:
            return self.partitioned.add(column)
        encoded = pc.dictionary_encode(column)
        if not self.blocks and len(encoded.dictionary) > HIGH_CARDINALITY * len(column):
            self.partitioned = PartitionedCodes()
            return self.partitioned.add(column)
        self.blocks.append(encoded)

    def finish(self) -> pd.Categorical:
        import pyarrow as pa

        if self.partitioned is not None:
            return as_categorical(*self.partitioned.finish())
        return _dictionary_column(pa.chunked_array(self.blocks, pa.dictionary(pa.int32(), pa.string())))


def _prefetched(batches, depth: int = 2):
    """The items of ``batches`` (an arrow reader, which parses on one core), the next ``depth``
    parsed in a thread while these are used; its error raised here."""
    import queue
    import threading

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


def _read_csv_columns(path: Path, sep: str, columns: list[str], categorical: list[str]) -> pd.DataFrame:
    """The named columns of a CSV file, as text (empty -> missing), read a block at a time (the
    next parsed while this one is used), the columns of a block encoded one per core; the
    ``categorical`` ones as codes (:class:`_TextColumn`), never a string per row."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    parse = pcsv.ParseOptions(delimiter=sep, newlines_in_values=True)
    try:
        with pcsv.open_csv(path, parse_options=parse) as head:
            header = head.schema.names
        present = [c for c in dict.fromkeys(columns) if c in header]
        convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in header}, include_columns=present,
                                      strings_can_be_null=True, null_values=[""])
        text = {c: _TextColumn() for c in present if c in categorical}
        plain: dict[str, list] = {c: [] for c in present if c not in categorical}
        with (pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES), parse_options=parse,
                            convert_options=convert) as reader,
              ThreadPoolExecutor(min(len(text), os.cpu_count() or 1) or 1) as pool):
            for batch in _prefetched(reader):
                for c in plain:
                    plain[c].append(batch.column(c))
                list(pool.map(lambda c: text[c].add(batch.column(c)), text))  # arrow releases the GIL
            out = dict(zip(text, pool.map(_TextColumn.finish, text.values())))
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a {sep!r}-separated CSV with a header line ({err})") from err
    out.update({c: pa.chunked_array(parts, pa.string()).to_pandas() for c, parts in plain.items()})
    return pd.DataFrame({c: out[c] for c in present}, copy=False)


def _dictionary_column(column) -> pd.Categorical:
    """A dictionary-encoded arrow column as one categorical. Each row group has its own
    dictionary (shared by its batches): the distinct dictionaries are put end to end and
    encoded in one pass, which gives every entry its code in the merged categories."""
    import pyarrow as pa
    import pyarrow.compute as pc

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


def read_custom(schema_path: str | Path) -> Table:
    """A CSV or Parquet file described by a small YAML schema.

    ```yaml
    name: my-log
    file: clicks.csv            # relative to the schema file
    sep: ","                    # CSV only
    fields:                     # prompt name -> column
      user ID: uid
      item title: title
    label: {column: click}      # already 0/1 ...
    # label: {column: rating, threshold: 3, drop_equal: false}   # ... or rating > threshold
    order: ts                   # optional (numbers or ISO dates/times); file order otherwise
    ```
    """
    schema_path = Path(schema_path)
    try:
        schema = yaml.safe_load(schema_path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{schema_path}: cannot read schema ({err})") from err
    for key in ("file", "fields", "label"):
        if key not in (schema or {}):
            raise DataError(f"{schema_path}: schema lacks the key {key!r}")
    path = (schema_path.parent / schema["file"]).resolve()
    if not path.exists():
        raise DataError(f"{schema_path}: data file {path} not found")
    fields: dict[str, str] = dict(schema["fields"])
    rule = LabelRule.from_schema(schema["label"])
    order_col = schema.get("order")
    others = [rule.column, *([order_col] if order_col else [])]
    columns, categorical = [*fields.values(), *others], [c for c in fields.values() if c not in others]
    if path.suffix == ".parquet":
        frame = _read_parquet_columns(path, columns, categorical)
    else:
        frame = _read_csv_columns(path, schema.get("sep", ","), columns, categorical)
    for col in columns:
        if col not in frame.columns:
            raise DataError(f"{path}: column {col!r} named in {schema_path} is missing "
                            f"(columns: {list(frame.columns)})")
    labels, keep = rule.apply(frame[rule.column], str(path))
    if not keep.all():
        frame, labels = frame.loc[keep].reset_index(drop=True), labels[keep]
    values = field_values(frame, fields)
    time = None
    if order_col:
        time = pd.DataFrame({order_col: order_key(frame[order_col], f"{path}: order column {order_col!r}")})
    return Table(schema.get("name", schema_path.stem), list(fields), values, labels, time)


READERS: dict[str, Callable[[Path], Table]] = {
    "ml-1m": read_movielens_1m,
    "bookcrossing": read_bookcrossing,
    "goodreads": read_goodreads,
}
# The split order of each dataset when data.order is not given (custom schemas: "time" when
# the schema names an order column, else "file").
DEFAULT_ORDER = {"ml-1m": "time", "bookcrossing": "shuffle", "goodreads": "time"}
