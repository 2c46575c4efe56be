"""The one place that knows a run folder's layout: training writes it, inference, reports,
figures and searches read it, all through :class:`RunFolder`.

A training run (``flipctr train``, each model of ``flipctr run``, each trial of ``flipctr tune``)::

    config.yaml                  the resolved configuration
    environment.json             versions, device, precision, seed, what decides the digits
    train.log, tensorboard/      the log and the TensorBoard event files
    metrics.json                 the protocol's metrics (written last: the run is finished)
    model.safetensors            the final weights (after the refit where there is one)
    model-selected.safetensors   the weights picked on validation (clean protocol, before the refit)
    checkpoint-<stage>.pt        each training stage's last epoch, until the run is finished
    config.json, feature_map.json, vocab.parquet, counts.npy
                                 what scoring new rows needs beside the weights (``flipctr.load``)

A FLIP run (``flipctr run``) holds ``config.yaml``, ``environment.json``, ``train.log``,
``results.{json,md}``, its pretraining in ``pretrain/`` and one training run per model
(``scratch/``, ``flip_id/``, ``flip_plm/``, ``flip/``). A pretraining folder holds
``pretrained.safetensors``, ``pretrain_history.json``, ``pretrain_state.pt`` (its checkpoint),
``pretrain_losses.png``, ``feature_map.json`` and ``tensorboard/``.
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


class RunFolder:
    """A run folder (see the module's docstring): where each of its files is, and how the
    configuration, environment, metrics and results are written and read back."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- a training run --------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def environment(self) -> Path:
        return self.path / "environment.json"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def model(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def selected_model(self) -> Path:
        return self.path / "model-selected.safetensors"

    def checkpoint(self, stage: str) -> Path:
        return self.path / f"checkpoint-{stage}.pt"

    @property
    def inference_config(self) -> Path:
        return self.path / "config.json"

    @property
    def feature_map(self) -> Path:
        return self.path / "feature_map.json"

    # -- a FLIP run ------------------------------------------------------------------------
    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def results_markdown(self) -> Path:
        return self.path / "results.md"

    @property
    def pretrain(self) -> "RunFolder":
        return RunFolder(self.path / "pretrain")

    def variant(self, name: str) -> "RunFolder":
        """The training run of one finetuned model (``scratch``, ``flip_id``, ``flip_plm``, ``flip``)."""
        return RunFolder(self.path / name)

    # -- a pretraining ---------------------------------------------------------------------
    @property
    def pretrained(self) -> Path:
        return self.path / f"{PRETRAINED}.safetensors"

    @property
    def pretrain_history(self) -> Path:
        return self.path / "pretrain_history.json"

    @property
    def pretrain_state(self) -> Path:
        return self.path / "pretrain_state.pt"

    @property
    def pretrain_plot(self) -> Path:
        return self.path / "pretrain_losses.png"

    # -- writing and reading ---------------------------------------------------------------
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

    def read_environment(self) -> dict[str, Any]:
        return json.loads(self.environment.read_text())

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
