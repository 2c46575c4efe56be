import json

import numpy as np
import pandas as pd
import pytest
import yaml

from flipctr.data.errors import DataError
from flipctr.data.readers import (BX_FIELDS, GOODREADS_FIELDS, ML1M_FIELDS, bx_age, read_bookcrossing,
                                  read_custom, read_goodreads, read_movielens_1m)

from flipctr.data.splits import order_table

from conftest import write_bx, write_goodreads, write_ml1m


def test_movielens_labels_order_and_words(tmp_path):
    folder = write_ml1m(tmp_path)
    raw = pd.read_csv(folder / "ratings.dat", sep="::", engine="python", header=None,
                      names=["u", "m", "r", "t"])
    # every rating at one of three timestamps: the ties must be broken by user, then movie
    raw["t"] = 978300000 + raw.index % 3
    (folder / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in raw.to_numpy()))
    table, described = order_table(read_movielens_1m(folder), "time", seed=0)
    assert described == "time (timestamp, user ID, movie ID)"
    assert len(table) == int((raw["r"] != 3).sum())  # ratings of 3 are dropped
    assert table.fields == ML1M_FIELDS
    # labels follow rating > 3; rows sorted by (timestamp, user ID, movie ID) as numbers
    kept = raw[raw["r"] != 3].sort_values(["t", "u", "m"], kind="stable")
    np.testing.assert_array_equal(table.labels, (kept["r"].to_numpy() > 3).astype(np.int8))
    np.testing.assert_array_equal(table.values["user ID"].to_numpy(), kept["u"].astype(str).to_numpy())
    np.testing.assert_array_equal(table.values["movie ID"].to_numpy(), kept["m"].astype(str).to_numpy())
    assert set(table.values["gender"]) <= {"female", "male"}
    assert set(table.values["age"]) <= {"under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"}
    assert "Action" in set(table.values["genre"]) and "Action|Comedy" not in set(table.values["genre"])
    assert table.values["title"].str.contains("Ã©t").all()  # latin-1 decoded as written


def test_movielens_occupation_words(tmp_path):
    folder = write_ml1m(tmp_path)
    (folder / "users.dat").write_bytes(
        b"".join(f"{u}::F::25::4::12345\n".encode() for u in range(1, 31)))
    table = read_movielens_1m(folder)
    assert set(table.values["occupation"]) == {"college/grad student"}
    assert set(table.values["age"]) == {"25-34"}
    assert set(table.values["gender"]) == {"female"}


def test_bookcrossing_rows_labels_and_values(tmp_path):
    table = read_bookcrossing(write_bx(tmp_path))
    assert table.fields == BX_FIELDS and table.time is None
    # dropped: an ISBN missing from BX-Books, a garbled ISBN, a user missing from BX-Users
    assert table.values["user ID"].tolist() == ["1", "2", "3", "3", "1", "4", "5", "6", "7", "8"]
    assert "3518365479<90" not in set(table.values["ISBN"]) and "9" not in set(table.values["user ID"])
    np.testing.assert_array_equal(table.labels, [0, 1, 1, 0, 1, 0, 0, 1, 1, 0])  # rating > 5, file order
    by_user = table.values.drop_duplicates("user ID").set_index("user ID")
    # country: after the second comma, trailing commas and empty parts cleaned, USA spelled so
    assert by_user["location"].to_dict() == {"1": "USA", "2": "USA", "3": "Portugal", "4": "United Kingdom",
                                             "5": "unknown", "6": "unknown", "7": "unknown", "8": "USA"}
    # ages NULL, 244, 0, 4, 101 -> unknown; 18 -> 18-24; 60 -> 60+; 5 -> under 18
    assert by_user["age"].to_dict() == {"1": "unknown", "2": "18-24", "3": "unknown", "4": "unknown",
                                        "5": "unknown", "6": "unknown", "7": "60+", "8": "under 18"}
    clara = table.values[table.values["ISBN"] == "0002005018"].iloc[0]
    assert clara["book title"] == 'Clara "Callan"; a novel'  # escaped quotes and a ';' inside quotes
    assert clara["publication year"] == "unknown" and clara["publisher"] == "unknown"  # year 0, "n/a"
    assert table.values[table.values["ISBN"] == "0060973129"].iloc[0]["book title"] == "Décision in Normandy"


def test_bx_age_buckets():
    ages = pd.Series(["NULL", "", "0", "4", "5", "17", "18", "24", "25", "29", "30", "55", "59", "60",
                      "100", "101", "24.5"])
    assert bx_age(ages).tolist() == [
        "unknown", "unknown", "unknown", "unknown", "under 18", "under 18", "18-24", "18-24", "25-29",
        "25-29", "30-34", "55-59", "55-59", "60+", "60+", "unknown", "18-24"]


def test_orders_shuffle_is_seeded_and_file_keeps_rows(tmp_path):
    table = read_bookcrossing(write_bx(tmp_path, extra_users=40))
    a, described = order_table(table, "shuffle", seed=42)
    b, _ = order_table(table, "shuffle", seed=42)
    c, _ = order_table(table, "shuffle", seed=7)
    assert described == "shuffle (seed 42)"
    pd.testing.assert_frame_equal(a.values, b.values)
    assert not a.values.equals(c.values) and not a.values.equals(table.values)
    key = lambda t: sorted(map(tuple, t.values.to_numpy()))  # noqa: E731
    assert key(a) == key(table)  # a permutation: no row lost or repeated
    assert order_table(table, "file", seed=0)[0] is table
    with pytest.raises(DataError, match="has none"):
        order_table(table, "time", seed=0)


def test_goodreads_fields_labels_order(tmp_path):
    table, _ = order_table(read_goodreads(write_goodreads(tmp_path)), "time", seed=0)
    assert table.fields == GOODREADS_FIELDS
    assert len(table) == 3  # rating 0 (shelved, not rated) is no sample
    assert table.values["user ID"].tolist() == ["u2", "u2", "u1"]  # by date_added
    np.testing.assert_array_equal(table.labels, [0, 1, 1])
    first = table.values.iloc[2]
    assert first["author name"] == "J.K. Rowling"
    assert first["book genres"] == "children, fantasy, paranormal"
    assert first["media type"] == "book"
    assert table.values.iloc[0]["number of pages"] == "unknown"


def test_custom_schema_threshold_and_order(tmp_path):
    pd.DataFrame({"uid": ["a", "b", "c", "a"], "item": ["x", "y", "x", "z"], "stars": [5, 1, 3, 4],
                  "ts": [4, 3, 2, 1]}).to_csv(tmp_path / "log.csv", index=False)
    schema = {"name": "mine", "file": "log.csv", "fields": {"user ID": "uid", "item ID": "item"},
              "label": {"column": "stars", "threshold": 3, "drop_equal": True}, "order": "ts"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    table, _ = order_table(read_custom(tmp_path / "s.yaml"), "time", seed=0)
    assert table.fields == ["user ID", "item ID"]
    assert table.values["item ID"].tolist() == ["z", "y", "x"]
    np.testing.assert_array_equal(table.labels, [1, 0, 1])


@pytest.mark.parametrize("broken, expect", [
    (b"1::1193::5::978300760\n1::661::3\n", "line 2"),              # truncated line
    (b"1,1193,5,978300760\n1,661,3,978302109\n", "'::'-separated"),  # wrong delimiter
])
def test_movielens_bad_file_names_file_and_line(tmp_path, broken, expect):
    folder = write_ml1m(tmp_path)
    (folder / "ratings.dat").write_bytes(broken)
    with pytest.raises(DataError, match=expect) as err:
        read_movielens_1m(folder)
    assert "ratings.dat" in str(err.value)


def test_bookcrossing_wrong_delimiter_names_file(tmp_path):
    folder = write_bx(tmp_path)
    (folder / "BX-Users.csv").write_text('"User-ID","Location","Age"\n"1","x, usa","3"\n')
    with pytest.raises(DataError, match="BX-Users.csv.*header lacks"):
        read_bookcrossing(folder)


@pytest.mark.parametrize("high_cardinality", [2.0, 0.0])  # blocks dictionary-encoded | every row in partitions
def test_custom_csv_is_read_in_blocks_as_pandas_reads_it(tmp_path, monkeypatch, high_cardinality):
    """A CSV log parsed a block at a time, its fields encoded per block or in partitions: the same
    text as pandas gives (quoted separators and line breaks, empty -> "unknown"), in file order."""
    from flipctr.data import formats

    monkeypatch.setattr(formats, "CSV_BLOCK_BYTES", 512)  # ~40 blocks, values first seen in later ones
    monkeypatch.setattr(formats, "HIGH_CARDINALITY", high_cardinality)
    rng = np.random.default_rng(0)
    n = 800
    frame = pd.DataFrame({"uid": rng.integers(0, 300, n).astype(str), "click": rng.integers(0, 2, n),
                          "title": rng.choice(["a, b", 'say "hi"', "two\nlines", "", "plain"], n)})
    frame.to_csv(tmp_path / "log.csv", index=False)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"file": "log.csv", "fields": {"user ID": "uid", "title": "title"}, "label": "click"}))
    table = read_custom(tmp_path / "s.yaml")
    raw = pd.read_csv(tmp_path / "log.csv", dtype=str, keep_default_na=False, na_values=[""])
    assert table.values["user ID"].astype(object).tolist() == raw["uid"].tolist()
    assert table.values["title"].astype(object).tolist() == raw["title"].fillna("unknown").tolist()
    assert "two\nlines" in set(table.values["title"]) and "unknown" in set(table.values["title"])
    np.testing.assert_array_equal(table.labels, frame["click"])


def test_custom_schema_missing_column_and_nan_label(tmp_path):
    pd.DataFrame({"uid": ["a", "b"], "click": [1, None]}).to_csv(tmp_path / "log.csv", index=False)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"file": "log.csv", "fields": {"user ID": "uid", "item ID": "item"}, "label": "click"}))
    with pytest.raises(DataError, match="column 'item'.*missing"):
        read_custom(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"file": "log.csv", "fields": {"user ID": "uid"}, "label": "click"}))
    with pytest.raises(DataError, match="row 2, label column 'click'"):
        read_custom(tmp_path / "s.yaml")


def test_goodreads_bad_interactions_file_is_a_clear_error(tmp_path):
    folder = write_goodreads(tmp_path)
    import gzip

    with gzip.open(folder / "goodreads_interactions.json.gz", "wt") as fh:
        fh.write('{"user_id": "u1", "book_id": "1"}\n')
    with pytest.raises(DataError, match="goodreads_interactions.json.gz: records lack keys"):
        read_goodreads(folder)


def test_goodreads_ids_must_be_json_strings_and_a_record_without_a_book_is_unknown(tmp_path):
    """Ids are JSON strings as in the UCSD files: a number is one clear error; a record without a
    book id is a sample whose book fields are all "unknown"."""
    import gzip

    folder = write_goodreads(tmp_path)
    records = [{"user_id": "u1", "book_id": "1", "rating": 5, "date_added": "Fri Aug 25 13:55:02 -0700 2017"},
               {"user_id": "u2", "rating": 4, "date_added": "Fri Aug 25 13:56:02 -0700 2017"}]
    with gzip.open(folder / "goodreads_interactions.json.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
    table = read_goodreads(folder)
    assert table.values["book title"].astype(str).tolist() == ["Harry Potter", "unknown"]
    assert table.values["book ID"].astype(str).tolist() == ["1", "unknown"]
    records[1]["book_id"] = 2
    with gzip.open(folder / "goodreads_interactions.json.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match="goodreads_interactions.json.gz: not JSON lines with string ids"):
        read_goodreads(folder)
    folder = write_goodreads(tmp_path / "numbers")
    with gzip.open(folder / "goodreads_books.json.gz", "wt") as fh:
        fh.write(json.dumps({"book_id": "1", "title": "Dune", "num_pages": 300}) + "\n")
    with pytest.raises(DataError, match="goodreads_books.json.gz: not JSON lines whose .* are typed as in the UCSD"):
        read_goodreads(folder)


def test_goodreads_book_missing_from_the_books_file_and_unreadable_dates(tmp_path):
    """An interaction whose book the books file lacks keeps its book id, every other book field
    "unknown"; an unreadable date_added is an error naming its record (shelf entries counted)."""
    import gzip

    folder = write_goodreads(tmp_path)
    records = [{"user_id": "u1", "book_id": "1", "rating": 0, "date_added": "Fri Aug 25 13:55:02 -0700 2017"},
               {"user_id": "u3", "book_id": "99", "rating": 5, "date_added": "Fri Aug 25 13:55:02 -0700 2017"},
               {"user_id": "u1", "book_id": "1", "rating": 4, "date_added": "Fri Aug 25 13:56:02 -0700 2017"}]
    with gzip.open(folder / "goodreads_interactions.json.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
    table = read_goodreads(folder)
    missing = table.values.iloc[0]
    assert missing["user ID"] == "u3" and missing["book ID"] == "99"
    assert (missing.drop(["user ID", "book ID"]) == "unknown").all()
    assert table.values.iloc[1]["book title"] == "Harry Potter"
    records[2]["date_added"] = "yesterday"
    with gzip.open(folder / "goodreads_interactions.json.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match="record 3 has an unreadable date_added"):
        read_goodreads(folder)


@pytest.mark.parametrize("stamps", [
    ["2023-01-05", "2023-01-03", "2023-01-04", "2022-12-31"],                           # ISO dates
    ["2023-01-05 12:00:00", "2023-01-05 09:30:00", "2023-01-05 11:00:00", "2023-01-04 23:59:59"],
    ["2023-01-05T12:00:00Z", "2023-01-05T09:30:00Z", "2023-01-05T11:00:00Z", "2023-01-04T23:59:59Z"],
    ["1672920000", "1672911000", "1672916400", "1672876799"],                         # epoch seconds
    ["1672920000000", "1672911000000", "1672916400000", "1672876799000"],             # epoch milliseconds
])
def test_custom_order_column_as_dates_times_or_epochs(tmp_path, stamps):
    pd.DataFrame({"uid": ["a", "b", "c", "d"], "click": [1, 0, 1, 0], "when": stamps}).to_csv(
        tmp_path / "log.csv", index=False)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"file": "log.csv", "fields": {"user ID": "uid"}, "label": "click", "order": "when"}))
    table, _ = order_table(read_custom(tmp_path / "s.yaml"), "time", seed=0)
    assert table.values["user ID"].tolist() == ["d", "b", "c", "a"]


def test_custom_order_column_native_parquet_datetimes_and_a_bad_value(tmp_path):
    times = pd.to_datetime(["2023-01-05 12:00", "2023-01-01 08:00", "2023-01-03 00:00"])
    pd.DataFrame({"uid": ["a", "b", "c"], "click": [1, 0, 1], "when": times}).to_parquet(tmp_path / "log.parquet")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"file": "log.parquet", "fields": {"user ID": "uid"}, "label": "click", "order": "when"}))
    table, _ = order_table(read_custom(tmp_path / "s.yaml"), "time", seed=0)
    assert table.values["user ID"].tolist() == ["b", "c", "a"]
    pd.DataFrame({"uid": ["a", "b", "c"], "click": [1, 0, 1],
                  "when": ["2023-01-05", "yesterday", "2023-01-03"]}).to_csv(tmp_path / "log.csv", index=False)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"file": "log.csv", "fields": {"user ID": "uid"}, "label": "click", "order": "when"}))
    with pytest.raises(DataError, match="order column 'when', row 2: 'yesterday'"):
        read_custom(tmp_path / "s.yaml")


@pytest.mark.parametrize("large_dictionary", [64 << 10, 0])  # merged row-group dictionaries | each row encoded
def test_custom_parquet_values_are_categorical_text_as_str_would_give(tmp_path, monkeypatch, large_dictionary):
    """A Parquet log's fields are read as categoricals from the file's dictionaries (no string
    per row; one dictionary per row group, merged), each distinct value turned into text once: the same text as ``str`` of each value
    (missing -> "unknown"), and the same ids as encoding the plain text."""
    import pyarrow.parquet as pq

    from flipctr.data import formats
    from flipctr.data.encoder import FeatureEncoder

    monkeypatch.setattr(formats, "LARGE_DICTIONARY_BYTES", large_dictionary)

    frame = pd.DataFrame({"uid": ["a", "b", None, "a", "c", "b"], "n": [1, 2, 2, 3, 1, 1],
                          "x": [0.5, None, 2.0, 0.5, 1.0, 2.0], "click": [1, 0, 1, 1, 0, 0]})
    # row groups of 2 rows: each has its own dictionary ("c" first seen in the last), merged on reading
    frame.to_parquet(tmp_path / "log.parquet", index=False, row_group_size=2)
    assert pq.ParquetFile(tmp_path / "log.parquet").num_row_groups == 3
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"file": "log.parquet", "label": "click",
                                                     "fields": {"user ID": "uid", "count": "n", "score": "x"}},
                                                    sort_keys=False))
    table = read_custom(tmp_path / "s.yaml")
    assert all(isinstance(table.values[f].dtype, pd.CategoricalDtype) for f in table.fields)
    plain = pd.DataFrame({name: frame[col].astype(str).where(frame[col].notna(), "unknown")
                          for name, col in {"user ID": "uid", "count": "n", "score": "x"}.items()})
    pd.testing.assert_frame_equal(table.values.astype(object), plain.astype(object))
    for min_count in (1, 2):
        fitted = FeatureEncoder(table.fields, min_count).fit(table.values.iloc[:4])
        reference = FeatureEncoder(table.fields, min_count).fit(plain.iloc[:4])
        assert fitted.feature_map == reference.feature_map
        np.testing.assert_array_equal(fitted.counts, reference.counts)
        np.testing.assert_array_equal(fitted.transform(table.values), reference.transform(plain))


def test_custom_integer_order_column_keeps_every_digit(tmp_path):
    """Nanosecond stamps 1 ns apart (equal as float64) still order the rows."""
    stamp = 1_700_000_000_000_000_000
    pd.DataFrame({"uid": ["late", "early", "mid"], "click": [1, 0, 1],
                  "ts": [stamp + 2, stamp, stamp + 1]}).to_parquet(tmp_path / "log.parquet", index=False)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"file": "log.parquet", "fields": {"user ID": "uid"}, "label": "click", "order": "ts"}))
    ordered, _ = order_table(read_custom(tmp_path / "s.yaml"), "time", 0)
    assert ordered.values["user ID"].astype(str).tolist() == ["early", "mid", "late"]


def test_custom_csv_with_a_bad_row_in_a_later_block_is_one_clear_error(tmp_path, monkeypatch):
    """A row with an extra column, parsed in the reading thread many blocks in: one DataError
    naming the file (not a hang, not an arrow error)."""
    from flipctr.data import formats

    monkeypatch.setattr(formats, "CSV_BLOCK_BYTES", 512)
    lines = ["uid,click", *(f"u{i},{i % 2}" for i in range(600)), "u600,1,surplus", *(f"u{i},1" for i in range(601, 700))]
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"file": "log.csv", "fields": {"user ID": "uid"}, "label": "click"}))
    with pytest.raises(DataError, match=r"log.csv: not a ','-separated CSV"):
        read_custom(tmp_path / "s.yaml")
