import numpy as np
import pandas as pd
import pytest
import yaml

from flipctr.data.errors import DataError
from flipctr.data.readers import (BX_FIELDS, GOODREADS_FIELDS, ML1M_FIELDS, read_bookcrossing,
                                  read_custom, read_goodreads, read_movielens_1m)

from conftest import write_bx, write_goodreads, write_ml1m


def test_movielens_labels_order_and_words(tmp_path):
    folder = write_ml1m(tmp_path)
    table = read_movielens_1m(folder)
    raw = pd.read_csv(folder / "ratings.dat", sep="::", engine="python", header=None,
                      names=["u", "m", "r", "t"])
    assert len(table) == int((raw["r"] != 3).sum())  # ratings of 3 are dropped
    assert table.fields == ML1M_FIELDS
    # labels follow rating > 3, rows sorted by timestamp (stable)
    kept = raw[raw["r"] != 3]
    order = np.argsort(kept["t"].to_numpy(), kind="stable")
    np.testing.assert_array_equal(table.labels, (kept["r"].to_numpy()[order] > 3).astype(np.int8))
    np.testing.assert_array_equal(table.values["user ID"].to_numpy(), kept["u"].astype(str).to_numpy()[order])
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


def test_bookcrossing_join_labels_country_age(tmp_path):
    table = read_bookcrossing(write_bx(tmp_path))
    assert table.fields == BX_FIELDS
    assert len(table) == 5  # the rating whose ISBN is not in BX-Books is dropped
    np.testing.assert_array_equal(table.labels, [0, 1, 1, 0, 1])  # rating > 5, file order
    assert table.values["location"].tolist() == ["usa", "usa", "portugal", "portugal", "usa"]
    assert table.values["age"].tolist() == ["unknown", "18", "unknown", "unknown", "unknown"]
    assert table.values["book title"].iloc[1] == 'Clara "Callan"'
    assert table.values["book title"].iloc[2] == "Décision in Normandy"


def test_goodreads_fields_labels_order(tmp_path):
    table = read_goodreads(write_goodreads(tmp_path))
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
    table = read_custom(tmp_path / "s.yaml")
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
