"""The one place that knows a run folder's layout (:class:`RunFolder`, whose attributes are its
files): training writes it, inference, reports, figures and searches read it.

Three kinds share it. A training run (``flipctr train``, each model of ``flipctr run``, each trial
of ``flipctr tune``) holds its configuration, environment, log, metrics (written last: the run is
finished), weights, its stages' checkpoints until it is finished, and what scoring new rows
needs (``flipctr.load``). A FLIP run (``flipctr run``) holds its configuration, environment, log
and results, its pretraining in ``pretrain/`` and one training run per finetuned model. A
pretraining holds its weights, history, checkpoint, loss plot and the encoding's layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..config import Config
from ..utils import write_json, write_text

ENCODING_FILES = ("feature_map.json", "vocab.parquet", "counts.npy")
PRETRAINED = "pretrained"  # a pretraining's weights: pretrained.safetensors, or shards pretrained-<k>of<n>.safetensors
STAGES = ("train", "refit")  # the training stages that checkpoint (selection, refit)


def _file(name: str, doc: str) -> property:
    return property(lambda folder: folder.path / name, doc=f"``{name}``: {doc}")


class RunFolder:
    """A run folder (see the module's docstring): where each of its files is, and how the
    configuration, environment, metrics and results are written and read back."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # a training run
    config = _file("config.yaml", "the resolved configuration")
    environment = _file("environment.json", "versions, device, precision, seed, what decides the digits")
    log = _file("train.log", "the log")
    tensorboard = _file("tensorboard", "TensorBoard's event files")
    metrics = _file("metrics.json", "the protocol's metrics, written last")
    model = _file("model.safetensors", "the final weights")
    selected_model = _file("model-selected.safetensors", "the weights picked on validation, before the refit")
    inference_config = _file("config.json", "what scoring new rows needs beside the weights and the encoding")
    feature_map = _file("feature_map.json", "the encoding's layout (of a pretraining too)")
    # a FLIP run
    results = _file("results.json", "each finetuned model's metrics, the paper's beside them")
    results_markdown = _file("results.md", "the same as a table")
    # a pretraining
    pretrained = _file(f"{PRETRAINED}.safetensors", "the pretrained weights")
    pretrain_history = _file("pretrain_history.json", "the losses, lr and time of each epoch")
    pretrain_state = _file("pretrain_state.pt", "the checkpoint a pretraining resumes from")
    pretrain_plot = _file("pretrain_losses.png", "the losses per epoch")

    def checkpoint(self, stage: str) -> Path:
        """A training stage's checkpoint (``train``: selection, ``refit``), until the run is finished."""
        return self.path / f"checkpoint-{stage}.pt"

    @property
    def pretrain(self) -> "RunFolder":
        """A FLIP run's pretraining."""
        return RunFolder(self.path / "pretrain")

    def variant(self, name: str) -> "RunFolder":
        """The training run of one finetuned model (``scratch``, ``flip_id``, ``flip_plm``, ``flip``)."""
        return RunFolder(self.path / name)

    def create(self) -> "RunFolder":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def write_config(self, cfg: Config) -> None:
        write_text(self.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def read_config(self) -> Config:
        return Config.from_dict(self.read_config_dict())

    def read_config_dict(self) -> dict[str, Any]:
        """``config.yaml`` as written (sections of plain values); one error where there is none."""
        if not self.config.exists():
            raise FileNotFoundError(f"{self.path}: no config.yaml (not a flipctr run folder)")
        return yaml.safe_load(self.config.read_text())

    def write_environment(self, info: dict[str, Any]) -> None:
        write_json(self.environment, info)

    @property
    def finished(self) -> bool:
        """Whether the training run finished (its metrics are written last)."""
        return self.metrics.exists()

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.metrics, metrics)

    def read_metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics.read_text())

    def remove_checkpoints(self) -> None:
        """The run is complete: its stages' checkpoints are not needed any more."""
        for stage in STAGES:
            self.checkpoint(stage).unlink(missing_ok=True)

    def write_results(self, report: dict[str, Any], markdown: str) -> None:
        write_json(self.results, report)
        write_text(self.results_markdown, markdown)

    def read_results(self) -> dict[str, Any]:
        """A FLIP run's ``results.json``; empty where the folder has none."""
        return json.loads(self.results.read_text()) if self.results.exists() else {}

    def read_inference_config(self) -> dict[str, Any]:
        return json.loads(self.inference_config.read_text())
