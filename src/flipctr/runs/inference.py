"""Using a trained run: load its folder, score new rows, export the model to ONNX.

A run folder holds everything needed to score rows: ``config.json`` (model and data settings,
the input column of every field, the prompt length), ``feature_map.json`` and ``vocab.parquet``
(the fitted encoding), ``model.safetensors`` (the weights). Models that read text (FLIP_PLM,
FLIP, the PLM-only model) build each row's prompt exactly as in training; a frozen encoder,
left out of the saved model, is loaded by name (``model.plm``) to compute the ``[CLS]`` vectors.
MoRec and CTR-BERT read the text of each row's item (and user) as in training, built once per
distinct item (user) of the rows scored.

    model = flipctr.load("runs/dcnv2")
    scores = model.predict(frame)      # pandas DataFrame in, numpy probabilities out
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import Config, ModelConfig
from ..data.batching import DeviceRows
from ..data.cache import PreparedData
from ..data.encoder import FeatureEncoder
from ..data.errors import DataError
from ..data.formats import field_values
from ..data.lm_files import hidden_size, load_tokenizer
from ..data.prompts import PromptBuilder
from ..data.schema import LabelRule
from ..data.text import tokenize_prompts
from ..models import TEXT_SIDES, CTRModule, build_ctr_model
from ..models.text_sides import SideText
from ..runtime.checkpoints import load_weights
from ..runtime.device import Runtime
from ..runtime.folder import ENCODING_FILES, RunFolder
from ..training.text_vectors import frozen_encoder, side_tables
from ..training.trainer import predict
from ..utils import atomic_path, write_json


class Scorer(nn.Module):
    """A CTR model as a function of the id matrix alone: ids (B, F) int -> probabilities (B,)."""

    def __init__(self, model: CTRModule):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(ids=ids).logits)


def write_inference_files(folder: RunFolder, cfg: Config, data: PreparedData, encoding: str, runtime: Runtime,
                          max_length: int | None, sides: dict[str, tuple[str, list[str]]]) -> None:
    """What :func:`load` reads beside the weights: ``config.json`` (model and data settings, the
    input column of every field and of the label, a text-side model's ``sides``, the precision it
    was evaluated in, which scoring replays, the prompts' ``max_length``) and the encoding the
    model was trained with (``feature_map.json``, ``vocab.parquet``, ``counts.npy``)."""
    columns, label = data.input_columns()
    write_json(folder.inference_config, {"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data),
                                         "encoding": encoding, "amp": runtime.amp_name, "fields": data.fields,
                                         "columns": columns, "label": label.to_dict(), "max_length": max_length,
                                         "sides": sides})
    for name in ENCODING_FILES:
        with atomic_path(folder.path / name) as tmp:
            shutil.copyfile(data.encoding_folder(encoding) / name, tmp)


@dataclass
class TextSide:
    """How a text model reads rows: the tokenizer, the prompt length of training, the frozen
    encoder whose ``[CLS]`` vectors the model reads (None when the model holds its encoder), and
    a text-side model's sides (side -> its key field and text fields)."""

    tokenizer: object
    max_length: int
    frozen_encoder: nn.Module | None
    sides: dict[str, tuple[str, list[str]]] = field(default_factory=dict)


class Predictor:
    """A trained CTR model with its encoding: scores rows given as a DataFrame."""

    def __init__(self, model: CTRModule, encoder: FeatureEncoder, columns: dict[str, str], label: dict | None,
                 text: TextSide | None = None, runtime: Runtime | None = None):
        """``runtime``: the precision the run evaluated in (its ``config.json``), replayed here so
        that scores equal the run's; computed on the CPU."""
        self.model, self.encoder, self.columns, self.label, self.text = model.eval(), encoder, columns, label, text
        self.runtime = runtime or Runtime(torch.device("cpu"))

    @classmethod
    def load(cls, run_dir: str | Path) -> "Predictor":
        folder = RunFolder(run_dir)
        if not folder.inference_config.exists():
            raise DataError(f"{run_dir}: no config.json; not a finished run folder (or one written before "
                            "flipctr saved its encoding with the model: train it again)")
        config = folder.read_inference_config()
        model_cfg = ModelConfig(**config["model"])
        sides = {side: (key, fields) for side, (key, fields) in config.get("sides", {}).items()}
        if model_cfg.name in TEXT_SIDES and not sides:
            raise DataError(f"{run_dir}: config.json names no user/item text fields (a run written before "
                            "flipctr saved them): train it again")
        # the sides' text tables are buffers left out of the weights: placeholders until rows come
        frozen_sides = model_cfg.plm_trainable_layers == 0
        placeholder = ({"vectors": torch.zeros(1, hidden_size(model_cfg.plm))} if frozen_sides else
                       {"tokens": torch.zeros(1, 1, dtype=torch.int64), "lengths": torch.ones(1, dtype=torch.int64)})
        encoder = FeatureEncoder.load(folder.path)
        model = build_ctr_model(model_cfg, encoder.feature_map, sides={side: placeholder for side in sides})
        model.load_state_dict(load_weights(folder.model))
        # the run's precision (runs written before it was saved evaluated in fp32 on CPUs without bf16)
        runtime = Runtime.create("cpu", config.get("amp", "off"))
        names, text = model.input_names, None
        if "input_ids" in names or "text_cls" in names or sides:
            frozen = None
            if "text_cls" in names or (sides and frozen_sides):
                frozen = frozen_encoder(model_cfg, runtime)  # as training ran it: weights in the autocast dtype
            text = TextSide(load_tokenizer(model_cfg.plm), config["max_length"], frozen, sides)
        return cls(model, encoder, config["columns"], config.get("label"), text, runtime)

    def values(self, frame: pd.DataFrame, source: str = "input") -> pd.DataFrame:
        """The fields' text values of ``frame``, as the readers give them (missing -> "unknown")."""
        missing = [column for column in self.columns.values() if column not in frame.columns]
        if missing:
            raise DataError(f"{source}: missing column(s) {missing}; the model reads {list(self.columns.values())}")
        return field_values(frame, self.columns)

    def encode(self, frame: pd.DataFrame, source: str = "input") -> np.ndarray:
        """The (N, F) id matrix of ``frame``; unseen values get their field's OOV id."""
        return self.encoder.transform(self.values(frame, source))

    def inputs(self, frame: pd.DataFrame) -> DeviceRows:
        """Every input the model reads, for the rows of ``frame`` (prompts built as in training).
        A text-side model (MoRec, CTR-BERT) is given the text of the frame's distinct users and
        items, which the returned rows index."""
        values = self.values(frame)
        arrays = {"ids": self.encoder.transform(values)}
        if self.text is not None and self.text.sides:
            arrays.update(self._side_inputs(values))
        elif self.text is not None:
            prompts = PromptBuilder(list(self.columns)).build(values)
            tok = tokenize_prompts(prompts, self.text.tokenizer, self.text.max_length)
            if self.text.frozen_encoder is not None:
                arrays["text_cls"] = self.text.frozen_encoder.sentence_vectors(
                    torch.from_numpy(tok.input_ids), torch.from_numpy(tok.lengths), 256).numpy()
            else:
                arrays.update(input_ids=tok.input_ids, lengths=tok.lengths)
        return DeviceRows.from_arrays(np.zeros(len(frame), dtype=np.float32), torch.device("cpu"), **arrays)

    def _side_inputs(self, values: pd.DataFrame) -> dict[str, np.ndarray]:
        """Each row's index into its side's table (``<side>_index``); the model's side tables
        become the text of the distinct users / items of ``values``."""
        tables, index = side_tables(values, self.text.sides, self.text.tokenizer, self.text.max_length,
                                    self.text.frozen_encoder)
        for side, table in tables.items():
            setattr(self.model, f"{side}_text", SideText(**table))
        return {f"{side}_index": rows for side, rows in index.items()}

    def predict(self, frame: pd.DataFrame, batch_size: int | None = None) -> np.ndarray:
        """Click probabilities (N,) for the rows of ``frame``, in order (batches of the model's
        evaluation size unless given)."""
        if len(frame) == 0:
            return np.zeros(0, dtype=np.float32)
        return predict(self.model, self.inputs(frame), batch_size or self.model.default_eval_batch_size, self.runtime)

    def labels(self, frame: pd.DataFrame, source: str = "input") -> pd.Series | None:
        """0/1 labels of ``frame`` by the run's label rule (``config.json``) when it has the label
        column; rows the rule drops (equal to the threshold with ``drop_equal``) are missing (NA).
        None without the column."""
        if not self.label or self.label["column"] not in frame.columns:
            return None
        labels, keep = LabelRule.from_schema(self.label).apply(frame[self.label["column"]], source)
        return pd.Series(labels, dtype="Int8").where(keep)

    def export_onnx(self, path: str | Path) -> Path:
        """An ONNX graph ``ids (batch, F) int64 -> probability (batch,)``, batch size dynamic."""
        if self.text is not None:
            raise DataError("ONNX export is for ID models (FLIP_ID included): this model reads text")
        path = Path(path)
        offsets = [f.offset for f in self.encoder.feature_map.fields]
        example = torch.tensor([offsets, offsets])  # two rows of OOV ids: a shape to trace with
        # a copy in eval mode: exporting must not touch the served model (BatchNorm statistics)
        scorer = Scorer(copy.deepcopy(self.model)).eval()
        program = torch.onnx.export(scorer, (example,), input_names=["ids"], output_names=["probability"],
                                    dynamic_shapes={"ids": {0: torch.export.Dim("batch")}}, dynamo=True,
                                    verbose=False)
        with atomic_path(path) as tmp:
            program.save(str(tmp))
        return path


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
