"""Prepared data on disk: the labelled table, its splits and its encodings, built once.

``prepare`` reads the raw files, splits, fits the encoders and writes everything into
``<data home>/cache/<dataset>-<key>/``, where ``key`` hashes the raw files' sha256 and the
preprocessing config. A later call finds the folder and only memory-maps arrays. The folder
is written under a temporary name and renamed when complete, so a failure leaves nothing.

Two encodings are kept: one fitted on ``train`` (model selection) and one on
``train+valid`` (refit, and the ``paper`` protocol). Each holds ids for ALL rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..utils import atomic_dir, data_home, sha256_file, write_json
from .datasets import DATASETS, default_order
from .encoder import FeatureEncoder, FeatureMap
from .errors import DataError, cache_file
from .readers import read_custom
from .schema import CustomSchema, LabelRule, is_schema
from .sources import raw_dir
from .splits import SplitSizes, order_table, split_sizes
from .table import RowFile, Table, ValueCodes

CACHE_VERSION = 3  # 3: values as codes + distinct names (value_codes.npy, value_names.parquet)
FIT_SPLITS = ("train", "train+valid")


def raw_checksums(dataset: str, root: Path | None = None) -> dict[str, str]:
    """sha256 of the raw inputs (read from SOURCE.json for downloaded datasets)."""
    if is_schema(dataset):
        schema = CustomSchema.load(dataset)
        if not schema.file.is_file():
            raise DataError(f"{schema.path}: data file {schema.file} not found")
        return {schema.path.name: sha256_file(schema.path), schema.file.name: sha256_file(schema.file)}
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}: use one of {list(DATASETS)} or a schema .yaml")
    folder = raw_dir(dataset, root)
    source = folder / "SOURCE.json"
    if not source.exists():
        raise DataError(f"{dataset}: raw files not found in {folder}; run `flipctr data get {dataset}`")
    return json.loads(source.read_text())["sha256"]


def resolve_data_config(cfg: DataConfig) -> DataConfig:
    """``cfg`` with ``order`` set to the dataset's default where it is None."""
    if cfg.order is not None:  # checked where it is used (splits.order_table)
        return cfg
    return dataclasses.replace(cfg, order=default_order(cfg.dataset))


def load_table(dataset: str, root: Path | None = None) -> Table:
    if is_schema(dataset):
        return read_custom(dataset)
    raw_checksums(dataset, root)  # clear error when the files were never fetched
    return DATASETS[dataset].reader(raw_dir(dataset, root))


@dataclass
class Encoding:
    ids: np.ndarray  # (N, F) global ids for every row, memory-mapped
    feature_map: FeatureMap
    counts: np.ndarray  # training frequency per global id (NCE noise, stats)


class PreparedData:
    """A prepared dataset: labels, split sizes and encodings, memory-mapped from its cache folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        with cache_file(folder / "meta.json", folder) as path:
            self.meta = json.loads(path.read_text())
            self.name: str = self.meta["name"]
            self.fields: list[str] = self.meta["fields"]
            self.sizes = SplitSizes(**self.meta["sizes"])
        with cache_file(folder / "labels.npy", folder) as path:
            self.labels = np.load(path, mmap_mode="r")
        if len(self.labels) != self.sizes.train + self.sizes.valid + self.sizes.test:
            raise DataError(f"{folder / 'labels.npy'}: {len(self.labels)} rows where meta.json says "
                            f"{self.sizes}; delete {folder} and run the command again to rebuild it")
        self._encodings: dict[str, Encoding] = {}

    def encoding(self, fit_split: str = "train") -> Encoding:
        if fit_split not in FIT_SPLITS:
            raise KeyError(f"encodings exist for {FIT_SPLITS}, not {fit_split!r}")
        if fit_split not in self._encodings:
            sub = self.folder / _encoding_dir(fit_split)
            with cache_file(sub / "ids.npy", self.folder) as path:
                ids = np.load(path, mmap_mode="r")
            with cache_file(sub / "feature_map.json", self.folder) as path:
                fmap = FeatureMap.load(path)
            with cache_file(sub / "counts.npy", self.folder) as path:
                encoding = Encoding(ids, fmap, np.load(path))
            if encoding.ids.shape != (len(self.labels), len(self.fields)):
                raise DataError(f"{sub / 'ids.npy'}: shape {encoding.ids.shape}, not ({len(self.labels)}, "
                                f"{len(self.fields)}); delete {self.folder} and run the command again to rebuild it")
            self._encodings[fit_split] = encoding
        return self._encodings[fit_split]

    def encoding_folder(self, fit_split: str) -> Path:
        """Where the encoding fitted on ``fit_split`` lives (``FeatureEncoder.load`` reads it)."""
        return self.folder / _encoding_dir(fit_split)

    def input_columns(self) -> tuple[dict[str, str], LabelRule]:
        """How raw rows name the fields and the label: ``({field: column}, label rule)``.
        Built-in datasets: the field names and a 0/1 ``label`` column; custom data: its schema's."""
        dataset = self.meta["config"]["dataset"]
        if is_schema(dataset):
            schema = CustomSchema.load(dataset)
            return dict(schema.fields), schema.label
        return {f: f for f in self.fields}, LabelRule("label")

    def split(self, name: str, fit_split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """``(ids, labels)`` of one split under the encoding fitted on ``fit_split``."""
        start, stop = self.sizes.bounds(name)
        return self.encoding(fit_split).ids[start:stop], self.labels[start:stop]

    def value_codes(self) -> ValueCodes:
        """Every row's values as codes into each field's distinct values (memory-mapped), in split order."""
        return ValueCodes.load(self.folder)

    def values(self) -> pd.DataFrame:
        """The text values of every field, in split order (categorical columns; the whole table in memory)."""
        return self.value_codes().frame()

    def stats(self) -> dict:
        """Counts; features per field both as fitted on train (the model's vocabulary, OOV slot
        included) and as distinct values over all samples (how the paper's Table 1 counts)."""
        enc = self.encoding("train")
        distinct = dict(zip(self.fields, (len(n) for n in self.value_codes().names), strict=True))
        return {
            "dataset": self.name,
            "samples": self.sizes.total,
            "positives": int(np.asarray(self.labels, dtype=np.int64).sum()),
            "positive_rate": round(float(np.mean(self.labels)), 6),
            "fields": len(self.fields),
            "order": self.meta["order"],
            "train": self.sizes.train, "valid": self.sizes.valid, "test": self.sizes.test,
            "features_per_field_fit_on_train": {f.name: f.size for f in enc.feature_map.fields},
            "num_features_fit_on_train": enc.feature_map.num_features,
            "features_per_field_all_samples": {f: int(distinct[f]) for f in self.fields},
            "num_features_all_samples": int(sum(distinct.values())),
            "cache": str(self.folder),
        }


def _encoding_dir(fit_split: str) -> str:
    return "encoding-fit-" + fit_split.replace("+", "-")


def cache_key(dataset: str, cfg: DataConfig, checksums: dict[str, str]) -> str:
    spec = {"version": CACHE_VERSION, "dataset": dataset, "raw": checksums,
            "test_fraction": cfg.test_fraction, "valid_fraction": cfg.valid_fraction,
            "min_count": cfg.min_count, "limit": cfg.limit, "order": cfg.order,
            **({"shuffle_seed": cfg.shuffle_seed} if cfg.order == "shuffle" else {})}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class _Stopwatch:
    """Wall seconds per step, in the order the steps ran."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 2)
        self._last = now


def prepare(cfg: DataConfig, root: Path | None = None, verbose: bool = True) -> PreparedData:
    """Return the prepared dataset, building its cache folder first if needed."""
    root = root or data_home()
    cfg = resolve_data_config(cfg)
    checksums = raw_checksums(cfg.dataset, root)
    label = Path(cfg.dataset).stem if is_schema(cfg.dataset) else cfg.dataset
    folder = root / "cache" / f"{label}-{cache_key(cfg.dataset, cfg, checksums)}"
    if (folder / "meta.json").exists():
        return PreparedData(folder)
    if verbose:
        print(f"[flipctr] preparing {cfg.dataset} into {folder}", file=sys.stderr)
    clock = _Stopwatch()
    table = load_table(cfg.dataset, root)
    clock.lap("read")
    table, order = order_table(table, cfg.order, cfg.shuffle_seed)
    if cfg.limit is not None:
        table = table.take(slice(0, int(cfg.limit)))
    sizes = split_sizes(len(table), cfg.test_fraction, cfg.valid_fraction)
    clock.lap("order")
    values = ValueCodes.from_frame(table.values, table.fields)
    name, fields, labels = table.name, table.fields, table.labels
    del table  # the codes hold the values now
    clock.lap("codes")
    with atomic_dir(folder, replace=False) as tmp:
        np.save(tmp / "labels.npy", np.ascontiguousarray(labels, dtype=np.int8))

        def encode(fit_split: str) -> None:
            start, stop = sizes.bounds(fit_split)
            encoder = FeatureEncoder(fields, cfg.min_count).fit(values, slice(start, stop))
            sub = tmp / _encoding_dir(fit_split)
            sub.mkdir()
            encoder.transform(values, out=RowFile.create(sub / "ids.npy", encoder.dtype, (len(values), len(fields))))
            encoder.save(sub)

        with ThreadPoolExecutor(len(FIT_SPLITS)) as pool:  # numpy and arrow release the GIL: one core each
            saved = pool.submit(values.save, tmp)  # mostly the disk's time
            list(pool.map(values.rank, range(len(fields))))  # the value order both fits break ties by, once
            list(pool.map(encode, FIT_SPLITS))
            saved.result()
        clock.lap("encode")
        write_json(tmp / "meta.json", {
            "name": name, "fields": fields, "order": order,
            "sizes": asdict(sizes), "config": asdict(cfg), "raw_sha256": checksums,
            "cache_version": CACHE_VERSION, "seconds": clock.laps,
        })
    return PreparedData(folder)
