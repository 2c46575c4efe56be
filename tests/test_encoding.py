import json

import numpy as np
import pandas as pd
import pytest

from flipctr.config import DataConfig
from flipctr.data.cache import prepare
from flipctr.data.encoder import MASK_ID, FeatureEncoder
from flipctr.data.errors import DataError
from flipctr.data.splits import split_sizes

from conftest import install_raw, write_bx, write_ml1m


def test_split_sizes_are_chronological_80_10_10():
    sizes = split_sizes(1000)
    assert (sizes.train, sizes.valid, sizes.test) == (800, 100, 100)
    assert sizes.bounds("valid") == (800, 900) and sizes.bounds("train+valid") == (0, 900)
    assert split_sizes(1000, valid_fraction=0.0).valid == 0


def test_empty_split_is_a_clear_error():
    with pytest.raises(DataError, match="split 'valid' is empty"):
        split_sizes(5)


def test_encoder_fits_on_train_only_with_oov_and_shared_mask():
    train = pd.DataFrame({"a": ["x", "y", "x", "z"], "b": ["p", "p", "q", "p"]})
    test = pd.DataFrame({"a": ["x", "new"], "b": ["unseen", "q"]})
    enc = FeatureEncoder(["a", "b"], min_count=2).fit(train)
    fmap = enc.feature_map
    assert MASK_ID == 0 and fmap.mask_id == 0
    a, b = fmap.fields
    assert (a.offset, a.size) == (1, 2)  # OOV + "x" ("y", "z" are below min_count)
    assert (b.offset, b.size) == (3, 2)  # OOV + "p" ("q" is below min_count)
    assert fmap.num_features == 5
    ids = enc.transform(test)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [[a.offset + 1, b.offset], [a.offset, b.offset]])
    # training frequencies per global id; each OOV slot counts its field's rare values
    np.testing.assert_array_equal(enc.counts, [0, 2, 2, 1, 3])
    # with min_count 1 every training value has its own id
    enc1 = FeatureEncoder(["a", "b"]).fit(train)
    assert [f.size for f in enc1.feature_map.fields] == [4, 3]
    np.testing.assert_array_equal(enc1.transform(test), [[2, 5], [1, 7]])


def test_vocabulary_order_is_the_same_from_text_and_from_codes(tmp_path):
    """Most frequent first, ties by value: fitted on a text table, or on its codes saved and read
    back (names in another order than sorted), the same vocabulary, counts and ids."""
    from flipctr.data.table import ValueCodes

    train = pd.DataFrame({"a": ["b", "a", "c", "a", "b", "d", "é", "B"], "b": ["1", "1", "10", "2", "2", "9", "9", "9"]})
    enc = FeatureEncoder(["a", "b"]).fit(train)
    assert enc.vocab["a"].to_pylist() == ["a", "b", "B", "c", "d", "é"]  # 2, 2, then 1s by code point
    assert enc.vocab["b"].to_pylist() == ["9", "1", "2", "10"]
    text = ValueCodes.from_frame(train, ["a", "b"])
    flipped = [n[::-1] for n in text.names]  # codes into names in reverse sorted order
    codes = np.asfortranarray(np.stack([len(n) - 1 - text.codes[:, j] for j, n in enumerate(text.names)], 1))
    ValueCodes(["a", "b"], codes, flipped).save(tmp_path)
    codes = ValueCodes.load(tmp_path)
    assert codes.names[0].to_pylist() == ["é", "d", "c", "b", "a", "B"]
    from_codes = FeatureEncoder(["a", "b"]).fit(codes, slice(0, 8))
    assert from_codes.feature_map == enc.feature_map
    assert all(from_codes.vocab[f].equals(enc.vocab[f]) for f in ["a", "b"])
    np.testing.assert_array_equal(from_codes.counts, enc.counts)
    np.testing.assert_array_equal(from_codes.transform(codes), enc.transform(train))
    np.testing.assert_array_equal(codes.frame().astype(object), train.astype(object))


@pytest.mark.parametrize("kind", ["string", "large_string"])
def test_partitioned_codes_encode_every_row_as_one_hash_table_would(kind):
    """Rows split into partitions by a few of their bytes get the codes and names one hash table
    over all rows gives (first appearance order; short, empty and nearly equal values; missing ->
    -1), across chunks that are slices of larger arrays."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from flipctr.data.table import PartitionedCodes

    rng = np.random.default_rng(0)
    pool = ["", "a", "ab", "ba", "a1b", "a2b", "é", "éé", "title of a book", "title of a bool", *map(str, range(300))]
    rows = [pool[i] if i < len(pool) else None for i in rng.integers(0, len(pool) + 5, 5000)]
    whole = pa.array(["x", *rows, "y"], getattr(pa, kind)())
    parts = PartitionedCodes(bits=3)
    for start, stop in ((1, 1200), (1200, 1201), (1201, 5001)):  # slices: chunks with an offset
        parts.add(whole.slice(start, stop - start))
    codes, names = parts.finish()
    assert names.type == pa.large_string() and codes.dtype == np.int32
    assert [None if c < 0 else names[int(c)].as_py() for c in codes] == rows
    one_table = pc.dictionary_encode(whole.slice(1, 5000))  # the codes of one hash table over all rows
    np.testing.assert_array_equal(codes, pc.fill_null(one_table.indices, -1).to_numpy())
    assert names.equals(one_table.dictionary.cast(pa.large_string()))
    assert len(np.unique(PartitionedCodes(bits=3)._partition(whole))) == 8  # the rows spread over all partitions


def test_encoder_save_load_roundtrip(tmp_path):
    train = pd.DataFrame({"a": ["x", "y", "x"], "b": ["1", "2", "3"]})
    enc = FeatureEncoder(["a", "b"]).fit(train)
    enc.save(tmp_path)
    again = FeatureEncoder.load(tmp_path)
    np.testing.assert_array_equal(again.transform(train), enc.transform(train))
    assert json.loads((tmp_path / "feature_map.json").read_text())["num_features"] == enc.feature_map.num_features


def test_prepare_caches_and_reuses(ml1m_root):
    data = prepare(DataConfig("ml-1m"), ml1m_root)
    stats = data.stats()
    assert stats["train"] + stats["valid"] + stats["test"] == stats["samples"]
    assert stats["fields"] == 8
    valid_ids, _ = data.split("valid", "train")
    assert valid_ids.dtype == np.int32
    mtime = (data.folder / "meta.json").stat().st_mtime_ns
    again = prepare(DataConfig("ml-1m"), ml1m_root)
    assert again.folder == data.folder and (again.folder / "meta.json").stat().st_mtime_ns == mtime
    assert isinstance(again.labels, np.memmap)


def test_values_seen_only_after_train_map_to_oov(tmp_path, data_root):
    # 20 rows in time order: 16 train, 2 valid, 2 test; users u5, u6 appear only in valid, u7 in test
    users = [f"u{i % 4}" for i in range(16)] + ["u5", "u6", "u7", "u0"]
    pd.DataFrame({"uid": users, "item": ["a", "b"] * 10, "click": [i % 2 for i in range(20)],
                  "ts": range(20)}).to_csv(tmp_path / "log.csv", index=False)
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"file": "log.csv", "fields": {"user ID": "uid", "item": "item"},
                                                     "label": "click", "order": "ts"}))
    data = prepare(DataConfig(str(tmp_path / "s.yaml")), data_root)
    col = data.fields.index("user ID")
    oov = data.encoding("train").feature_map.fields[col].offset
    for fit, split, expected_oov in (("train", "valid", [True, True]), ("train", "test", [True, False]),
                                     ("train+valid", "valid", [False, False]),
                                     ("train+valid", "test", [True, False])):
        ids, _ = data.split(split, fit)
        offset = data.encoding(fit).feature_map.fields[col].offset
        assert list(ids[:, col] == offset) == expected_oov, (fit, split)
    train_ids, _ = data.split("train", "train")
    assert (train_ids[:, col] > oov).all()  # every training value has its own id


def test_prepare_failure_leaves_no_cache(tmp_path, data_root):
    raw = write_ml1m(tmp_path / "raw")
    (raw / "ratings.dat").write_bytes(b"1::1::5::100\n1::2::4\n")
    install_raw(data_root, "ml-1m", raw)
    with pytest.raises(DataError, match="ratings.dat"):
        prepare(DataConfig("ml-1m"), data_root)
    cache = data_root / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_prepare_empty_split_leaves_no_cache(ml1m_root):
    with pytest.raises(DataError, match="is empty"):
        prepare(DataConfig("ml-1m", limit=5), ml1m_root)
    cache = ml1m_root / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_limit_takes_the_first_samples_in_split_order(ml1m_root):
    full = prepare(DataConfig("ml-1m"), ml1m_root)
    small = prepare(DataConfig("ml-1m", limit=100), ml1m_root)
    assert small.sizes.total == 100 and small.folder != full.folder
    np.testing.assert_array_equal(small.labels, full.labels[:100])


def test_shuffle_order_is_seeded_with_its_own_cache(ml1m_root):
    base = prepare(DataConfig("ml-1m"), ml1m_root)
    assert base.meta["order"] == "time (timestamp, user ID, movie ID)"  # ML-1M's default
    shuffled = prepare(DataConfig("ml-1m", order="shuffle", shuffle_seed=1), ml1m_root)
    again = prepare(DataConfig("ml-1m", order="shuffle", shuffle_seed=1), ml1m_root)
    other = prepare(DataConfig("ml-1m", order="shuffle", shuffle_seed=2), ml1m_root)
    assert shuffled.folder != base.folder and again.folder == shuffled.folder != other.folder
    assert sorted(shuffled.values()["user ID"]) == sorted(base.values()["user ID"])
    assert not shuffled.values()["user ID"].equals(base.values()["user ID"])
    assert not shuffled.values().equals(other.values())
    assert shuffled.meta["order"] == "shuffle (seed 1)"
    with pytest.raises(DataError, match="data.order"):
        prepare(DataConfig("ml-1m", order="sideways"), ml1m_root)


def test_bookcrossing_defaults_to_a_seeded_shuffle_with_disjoint_splits(tmp_path, data_root):
    install_raw(data_root, "bookcrossing", write_bx(tmp_path / "bx", extra_users=60))
    data = prepare(DataConfig("bookcrossing"), data_root)
    assert data.meta["order"] == "shuffle (seed 42)" and data.meta["config"]["order"] == "shuffle"
    assert data.meta["config"]["shuffle_seed"] == 42
    # the splits are disjoint ranges covering every row once
    rows = data.values().assign(label=np.asarray(data.labels))
    parts = [rows.iloc[slice(*data.sizes.bounds(name))] for name in ("train", "valid", "test")]
    assert sum(len(p) for p in parts) == len(rows)
    whole = pd.concat(parts).sort_values(list(rows.columns)).reset_index(drop=True)
    pd.testing.assert_frame_equal(whole, rows.sort_values(list(rows.columns)).reset_index(drop=True))
    file_order = prepare(DataConfig("bookcrossing", order="file"), data_root)
    assert file_order.meta["order"] == "file" and file_order.folder != data.folder
    assert file_order.values()["user ID"].iloc[0] == "1"
    stats = data.stats()
    assert stats["features_per_field_all_samples"]["age"] == data.values()["age"].nunique()
    assert stats["num_features_fit_on_train"] == data.encoding("train").feature_map.num_features
