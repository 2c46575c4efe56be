"""The GoodReads-shaped generator of benchmarks/scale.py: seeded, the 15 GoodReads fields, the
same log in both layouts (the GoodReads reader's UCSD files and a custom Parquet + schema), users
and books skewed."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from flipctr.data.readers import GOODREADS_FIELDS, read_custom, read_goodreads

spec = importlib.util.spec_from_file_location("scale", Path(__file__).parent.parent / "benchmarks" / "scale.py")
scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale)


def test_both_layouts_hold_the_same_seeded_log(tmp_path):
    custom = read_custom(scale.generate_parquet(3000, tmp_path / "a", seed=3))
    again = read_custom(scale.generate_parquet(3000, tmp_path / "b", seed=3))
    other = read_custom(scale.generate_parquet(3000, tmp_path / "c", seed=4))
    ucsd = read_goodreads(scale.generate_ucsd(3000, tmp_path / "ucsd", seed=3))
    assert custom.fields == ucsd.fields == GOODREADS_FIELDS and len(custom.values) == 3000
    pd.testing.assert_frame_equal(custom.values, again.values)
    assert not custom.values.equals(other.values)
    pd.testing.assert_frame_equal(custom.values.reset_index(drop=True).astype(object),
                                  ucsd.values.reset_index(drop=True).astype(object))
    np.testing.assert_array_equal(custom.labels, ucsd.labels)
    assert 0.5 < custom.labels.mean() < 0.8  # ratings > 3, as GoodReads' ~2/3


def test_ucsd_interactions_read_in_many_blocks_as_in_one(tmp_path, monkeypatch):
    """The interactions file parsed ~100 blocks at a time (the next in a thread): the same table
    as in one block, times included."""
    from flipctr.data import formats

    folder = scale.generate_ucsd(3000, tmp_path, seed=5)
    whole = read_goodreads(folder)
    monkeypatch.setattr(formats, "JSON_BLOCK_BYTES", 4096)
    blocks = read_goodreads(folder)
    pd.testing.assert_frame_equal(whole.values.astype(object), blocks.values.astype(object))
    pd.testing.assert_frame_equal(whole.time, blocks.time)
    np.testing.assert_array_equal(whole.labels, blocks.labels)


def test_users_and_books_are_skewed(tmp_path):
    values = read_custom(scale.generate_parquet(20_000, tmp_path, seed=0)).values
    for field in ("user ID", "book ID"):
        counts = values[field].value_counts()
        assert counts.iloc[0] > 20 * counts.median()  # a few very frequent, most rare
    books = values.drop_duplicates("book ID")
    assert books["book title"].str.split().str.len().between(1, 12).all()
    assert (values.groupby("book ID")["author name"].nunique() == 1).all()  # attributes fixed per book
