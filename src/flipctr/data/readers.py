"""Readers: raw files of one dataset -> :class:`Table` (named text fields, label, order); the
file formats underneath are :mod:`.formats`, what else is known of each dataset :mod:`.datasets`.

Values are the words a person would use ("25-34", "college/grad student", "female"), since
the same table feeds the ID encoder and the text prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .errors import DataError
from .formats import (
    TextColumn,
    as_text,
    field_values,
    json_blocks,
    json_lines,
    json_table,
    order_key,
    read_csv_columns,
    read_parquet_columns,
)
from .schema import CustomSchema
from .table import Table

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


GOODREADS_DATE = "%a %b %d %H:%M:%S %z %Y"


def _goodreads_interactions(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Rated interactions (rating 1..5): ``(user_id and book_id as categoricals + rating, date_added
    as int64 ns)``, parsed by arrow a block at a time (the next in a thread): only these four keys
    of the (large) interaction records are read, ids as in the UCSD files (JSON strings), dates
    parsed per block, and a row holds codes, not strings."""
    keys = {"user_id": pa.string(), "book_id": pa.string(), "rating": pa.float64(), "date_added": pa.string()}
    ids = {"user_id": TextColumn(), "book_id": TextColumn()}
    ratings, stamps, seen = [], [], 0
    for batch in json_blocks(path, keys, expected="with string ids"):
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

    text = pa.string()
    books = json_table(folder / "goodreads_books.json.gz", {
        **dict.fromkeys(["book_id", "title", "average_rating", "text_reviews_count", "num_pages", "is_ebook", "format",
                         "publisher", "publication_year", "work_id"], text),
        "authors": pa.list_(pa.struct([("author_id", text)]))})
    listed = books.column("authors").combine_chunks()
    has_author = pc.fill_null(pc.greater(pc.list_value_length(listed), 0), False)
    first_author = pc.struct_field(pc.list_element(listed.filter(has_author), 0), "author_id")
    books = books.drop_columns(["authors"]).to_pandas()
    books["author_id"] = ""
    books.loc[has_author.to_numpy(zero_copy_only=False), "author_id"] = first_author.to_numpy(zero_copy_only=False)
    authors = json_table(folder / "goodreads_book_authors.json.gz", {"author_id": text, "name": text}).to_pandas()
    # genres are objects of varying keys (genre -> count): read record by record
    genres = pd.DataFrame(json_lines(folder / "goodreads_book_genres_initial.json.gz", ["book_id", "genres"]))
    genres["book genres"] = genres["genres"].map(
        lambda g: ", ".join(k for k, _ in sorted(g.items(), key=lambda kv: -kv[1])) if g else "")
    works = json_table(folder / "goodreads_book_works.json.gz", {"work_id": text, "media_type": text}).to_pandas()
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
    values = pd.DataFrame({"user ID": as_text(inter["user_id"], ("", "nan")),
                           # the interaction's own book id, listed in the books file or not
                           "book ID": as_text(inter["book_id"], ("", "nan")),
                           **{name: attribute(col) for name, col in columns.items()}})
    time = pd.DataFrame({"date_added": stamp})
    return Table("goodreads", list(GOODREADS_FIELDS), values, labels, time)


def read_custom(schema: CustomSchema | str | Path) -> Table:
    """The CSV or Parquet file a custom schema (:mod:`.schema`) describes, its fields as text, its
    label by the schema's rule, its order column as a sortable key."""
    schema = schema if isinstance(schema, CustomSchema) else CustomSchema.load(schema)
    path, fields, rule = schema.file, schema.fields, schema.label
    if not path.exists():
        raise DataError(f"{schema.path}: data file {path} not found")
    others = [rule.column, *([schema.order] if schema.order else [])]
    columns, categorical = [*fields.values(), *others], [c for c in fields.values() if c not in others]
    if path.suffix == ".parquet":
        frame = read_parquet_columns(path, columns, categorical)
    else:
        frame = read_csv_columns(path, schema.sep, columns, categorical)
    for col in columns:
        if col not in frame.columns:
            raise DataError(f"{path}: column {col!r} named in {schema.path} is missing "
                            f"(columns: {list(frame.columns)})")
    labels, keep = rule.apply(frame[rule.column], str(path))
    if not keep.all():
        frame, labels = frame.loc[keep].reset_index(drop=True), labels[keep]
    values = field_values(frame, fields)
    time = None
    if schema.order:
        time = pd.DataFrame({schema.order: order_key(frame[schema.order], f"{path}: order column {schema.order!r}")})
    return Table(schema.name, list(fields), values, labels, time)
