"""Using a trained run: load its folder, score new rows, export the model to ONNX.

A run folder of an ID model (FLIP_ID included) holds everything needed to score rows:
``config.json`` (model and data settings, the input column of every field), ``feature_map.json``
and ``vocab.parquet`` (the fitted encoding), ``model.safetensors`` (the weights).

    model = flipctr.load("runs/dcnv2")
    scores = model.predict(frame)      # pandas DataFrame in, numpy probabilities out
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from torch import nn

from .config import ModelConfig
from .data.encoder import FeatureEncoder
from .data.errors import DataError
from .models import build_ctr_model
from .utils import atomic_path

TEXT_MODELS = ("plm", "flip")


class Scorer(nn.Module):
    """A CTR model as a function of the id matrix alone: ids (B, F) int -> probabilities (B,)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(ids=ids).logits)


class Predictor:
    """A trained ID model with its encoding: scores rows given as a DataFrame."""

    def __init__(self, model: nn.Module, encoder: FeatureEncoder, columns: dict[str, str],
                 label: dict | None, run_dir: Path):
        self.model, self.encoder, self.columns, self.label, self.run_dir = model.eval(), encoder, columns, label, run_dir

    @classmethod
    def load(cls, run_dir: str | Path) -> "Predictor":
        run_dir = Path(run_dir)
        config_path = run_dir / "config.json"
        if not config_path.exists():
            raise DataError(f"{run_dir}: no config.json; not a finished run folder (or one written before "
                            "flipctr saved its encoding with the model: train it again)")
        config = json.loads(config_path.read_text())
        model_cfg = ModelConfig(**config["model"])
        if model_cfg.name in TEXT_MODELS:
            raise DataError(f"{run_dir}: a {model_cfg.name!r} model reads text; scoring new rows is implemented "
                            "for ID models (FLIP_ID included) only")
        encoder = FeatureEncoder.load(run_dir)
        model = build_ctr_model(model_cfg, encoder.feature_map)
        model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
        return cls(model, encoder, config["columns"], config.get("label"), run_dir)

    def encode(self, frame: pd.DataFrame, source: str = "input") -> np.ndarray:
        """The (N, F) id matrix of ``frame``; unseen values get their field's OOV id."""
        missing = [column for column in self.columns.values() if column not in frame.columns]
        if missing:
            raise DataError(f"{source}: missing column(s) {missing}; the model reads {list(self.columns.values())}")
        values = pd.DataFrame({field: frame[column].astype(str).where(frame[column].notna(), "unknown")
                               for field, column in self.columns.items()})
        return self.encoder.transform(values)

    @torch.no_grad()
    def predict(self, frame: pd.DataFrame, batch_size: int = 65536) -> np.ndarray:
        """Click probabilities (N,) for the rows of ``frame``, in order."""
        ids = torch.from_numpy(self.encode(frame))
        scorer = Scorer(self.model)
        return torch.cat([scorer(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]).numpy() \
            if len(ids) else np.zeros(0, dtype=np.float32)

    def labels(self, frame: pd.DataFrame) -> np.ndarray | None:
        """0/1 labels of ``frame`` when it has the run's label column, as in training; else None."""
        if not self.label or self.label["column"] not in frame.columns:
            return None
        raw = pd.to_numeric(frame[self.label["column"]], errors="coerce")
        if raw.isna().any():
            row = int(np.argmax(raw.isna().to_numpy()))
            raise DataError(f"row {row + 1}: label column {self.label['column']!r} is empty or not a number")
        threshold = self.label.get("threshold")
        return (raw > threshold if threshold is not None else raw > 0.5).to_numpy().astype(np.int8)

    def export_onnx(self, path: str | Path) -> Path:
        """An ONNX graph ``ids (batch, F) int64 -> probability (batch,)``, batch size dynamic."""
        path = Path(path)
        example = torch.from_numpy(self.encode_example()).long()
        # a copy in eval mode: exporting must not touch the served model (BatchNorm statistics)
        scorer = Scorer(copy.deepcopy(self.model)).eval()
        program = torch.onnx.export(scorer, (example,), input_names=["ids"], output_names=["probability"],
                                    dynamic_shapes={"ids": {0: torch.export.Dim("batch")}}, dynamo=True,
                                    verbose=False)
        with atomic_path(path) as tmp:
            program.save(str(tmp))
        return path

    def encode_example(self) -> np.ndarray:
        """Two rows of OOV ids (a shape to trace the graph with)."""
        offsets = np.array([f.offset for f in self.encoder.feature_map.fields], dtype=np.int64)
        return np.stack([offsets, offsets])


def read_frame(path: str | Path) -> pd.DataFrame:
    """A CSV (every column as text) or Parquet file; one clear error when it cannot be read."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read ({err})") from err


def load(run_dir: str | Path) -> Predictor:
    """``flipctr.load(run_dir)``: the run's model, ready for ``.predict(frame)``."""
    return Predictor.load(run_dir)
