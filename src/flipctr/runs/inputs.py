"""What a model reads from a prepared dataset: its splits' arrays on the device (ids, tokenized
prompts, a frozen encoder's cached vectors) and, for the text-side models, the text of every
user and item."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..config import Config
from ..data.batching import DeviceRows
from ..data.cache import PreparedData
from ..data.datasets import prompt_length, side_fields
from ..data.lm_files import load_tokenizer
from ..data.text import prompts_for
from ..models import TEXT_SIDES, CTRModule
from ..runtime.device import Runtime
from ..training.text_vectors import TextVectors, frozen_encoder, side_tables


def side_texts(data: PreparedData, cfg: Config, runtime: Runtime
               ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, np.ndarray]]:
    """:func:`~flipctr.training.text_vectors.side_tables` of ``cfg.model`` on the prepared data (a frozen
    ``cfg.model.plm``'s vectors cached beside it); both empty for models without text sides."""
    wanted = model_sides(cfg.model.name, data.name)
    if not wanted:
        return {}, {}
    frozen = frozen_encoder(cfg.model, runtime) if cfg.model.plm_trainable_layers == 0 else None
    return side_tables(data.values(), wanted, load_tokenizer(cfg.model.plm), prompt_length(cfg.data, data.name), frozen,
                       data.folder, cfg.train.eval_batch_size or 256)


def model_sides(model: str, dataset: str) -> dict[str, tuple[str, list[str]]]:
    """:func:`~flipctr.data.datasets.side_fields` of a text-side model (:data:`TEXT_SIDES`); empty
    for other models."""
    return side_fields(dataset, TEXT_SIDES.get(model, {}), model)


class ModelInputs:
    """The arrays a model needs from a prepared dataset: ids, and tokenized prompts for
    language-model inputs (built once and cached beside the encoded table)."""

    def __init__(self, data: PreparedData, cfg: Config, device: torch.device, text: bool):
        self.data, self.device, self.text = data, device, None
        self.text_vectors: Callable[[int, int], np.ndarray] | None = None
        self.side_index: dict[str, np.ndarray] = {}  # MoRec, CTR-BERT: each row's user / item
        # the prompts' length as the model sees it (None: chosen from the data when its prompts are built)
        self.max_length = prompt_length(cfg.data, data.name)
        if text:
            self.text = prompts_for(data, cfg.data, cfg.model.plm)
            self.max_length = self.text.report["max_length"]

    @classmethod
    def for_model(cls, data: PreparedData, cfg: Config, runtime: Runtime, model: CTRModule) -> "ModelInputs":
        """The inputs ``model`` reads; ``text_cls``: the cached vectors of the frozen ``cfg.model.plm``."""
        names = model.input_names
        rd = cls(data, cfg, runtime.device, text="input_ids" in names or "text_cls" in names)
        if "text_cls" in names:
            rd.text_vectors = TextVectors(frozen_encoder(cfg.model, runtime), rd.text, runtime,
                                          cfg.train.eval_batch_size or 256)
        return rd

    def split(self, name: str, fit: str, last: int | None = None, spans: bool = False,
              sample: int | None = None, seed: int = 0) -> DeviceRows:
        """Split ``name`` under the encoding fitted on ``fit``; ``last``: only its most recent rows;
        ``sample``: a seeded uniform sample of that many of its rows (kept in time order). On the
        CPU, or where the split's arrays would take more than half of the device's free memory,
        they stay in the memory-mapped cache and each batch is gathered from it
        (:class:`~flipctr.data.batching.MappedArray`): the same batches, no copy of the split."""
        start, stop = self.data.sizes.bounds(name)
        if last is not None:
            start = max(start, stop - last)
        rows: slice | np.ndarray = slice(start, stop)
        if sample is not None and sample < stop - start:
            if self.text_vectors is not None:
                raise ValueError("text vectors are cached per row range: a random sample cannot use them")
            rows = np.sort(np.random.default_rng(seed).choice(np.arange(start, stop), sample, replace=False))
        labels = self.data.labels[rows]
        arrays = {"ids": self.data.encoding(fit).ids[rows]}
        if self.text is not None:
            arrays.update(input_ids=self.text.input_ids[rows], lengths=self.text.lengths[rows])
            if spans:
                arrays["value_spans"] = self.text.value_spans[rows]
        if self.text_vectors is not None:
            arrays["text_cls"] = self.text_vectors(start, stop)
        for side, index in self.side_index.items():
            arrays[f"{side}_index"] = index[rows]
        return DeviceRows.from_arrays(labels, self.device, mapped=self.mapped(arrays), **arrays)

    def mapped(self, arrays: dict[str, np.ndarray]) -> bool:
        """Whether a split's arrays stay on disk (see :meth:`split`)."""
        if self.device.type == "cpu":
            return True
        if self.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return sum(a.nbytes * (2 if a.dtype == np.uint16 else 1) for a in arrays.values()) > free / 2
