"""Sentence vectors (``[CLS]``) of a frozen language model, computed once per row range and
cached beside the tokenized prompts.

A frozen encoder gives every model the same vectors, so FLIP_PLM, FLIP and every seed share
one pass over each row range instead of one per epoch and per model. The cache key is a
hash of the encoder's weights and the dtype it ran in. Under DDP the ranks share that pass:
each encodes every world-th row, the vectors are gathered, rank 0 writes the cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import ModelConfig
from ..data.prompts import PromptBuilder
from ..data.text import TokenizedPrompts, tokenize_prompts
from ..models.language import LanguageModel
from ..runtime.device import Runtime
from ..runtime.distributed import barrier, gather_rows, is_main, rank_rows
from ..utils import atomic_path

log = logging.getLogger("flipctr")


def weights_fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def sharded_sentence_vectors(language_model: LanguageModel, input_ids: np.ndarray, lengths: np.ndarray,
                             batch_size: int) -> np.ndarray:
    """``[CLS]`` of every row, (N, L) -> (N, H) float32, on every rank. Under DDP each rank
    encodes its :func:`~.distributed.rank_rows` and the vectors are gathered, so the ranks
    split one pass instead of each making all of it."""
    rows = rank_rows(len(lengths)).numpy()
    vectors = language_model.sentence_vectors(torch.from_numpy(np.array(input_ids[rows], dtype=np.int32)),
                                              torch.from_numpy(np.array(lengths[rows])), batch_size)
    device = next(language_model.parameters()).device  # NCCL gathers GPU tensors
    return gather_rows(vectors.to(device), len(lengths)).cpu().numpy()


def _save_on_main(path: Path | None, save) -> None:
    """Rank 0 writes ``path`` (atomically); every rank waits until it exists, so that none of
    them finds it missing on a later call that the others read from it."""
    if path is not None:
        if is_main():
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                save(fh)
        barrier()


def frozen_encoder(model: ModelConfig, runtime: Runtime) -> LanguageModel:
    """``model.plm`` loaded, frozen and on ``runtime``'s device with its weights in the autocast
    dtype: as every frozen encoder runs (training's cached vectors, text sides, ``predict``)."""
    lm = LanguageModel.from_pretrained(model.plm, model.plm_attention_mask)
    lm.freeze(0)
    return runtime.frozen(lm)


class TextVectors:
    """``vectors(start, stop) -> (stop - start, H) float32``: ``[CLS]`` of rows [start, stop)."""

    def __init__(self, language_model: LanguageModel, text: TokenizedPrompts, runtime: Runtime,
                 batch_size: int = 256, folder: Path | None = None):
        """``runtime``: the device and precision of the run (the encoder's weights in its autocast
        dtype)."""
        if language_model.trainable:
            raise ValueError("cached text vectors need a frozen language model (model.plm_trainable_layers=0)")
        self.text, self.device, self.batch_size = text, runtime.device, batch_size
        self.hidden_size = language_model.hidden_size
        key = f"{weights_fingerprint(language_model)}-{str(runtime.amp_dtype or torch.float32).split('.')[-1]}"
        root = folder or text.folder
        self.folder = None if root is None else Path(root) / f"cls-{key}"
        self.language_model = runtime.frozen(copy.deepcopy(language_model))

    def __call__(self, start: int, stop: int) -> np.ndarray:
        path = None if self.folder is None else self.folder / f"{start}-{stop}.npy"
        if path is not None and path.exists():
            return np.load(path)
        tick = time.perf_counter()
        vectors = sharded_sentence_vectors(self.language_model, self.text.input_ids[start:stop],
                                           self.text.lengths[start:stop], self.batch_size)
        log.info("text vectors of rows [%d, %d): %.0f s (%.0f rows/s)", start, stop, time.perf_counter() - tick,
                 (stop - start) / max(time.perf_counter() - tick, 1e-9))
        _save_on_main(path, lambda fh: np.save(fh, vectors))
        return vectors


def distinct_texts(values, key: str, text_fields: list[str], tokenizer,
                   max_length: int) -> tuple[TokenizedPrompts, np.ndarray]:
    """``(prompts (K, L), index (N,) int32)``: the tokenized text (``text_fields`` as a prompt) of
    every distinct value of field ``key`` (an item, a user), and each row's value (rows of
    ``values``, a DataFrame in split order). Rows sharing a key share its text: its first row's."""
    codes, uniques = pd.factorize(values[key], sort=False)
    first = values.drop_duplicates(subset=[key], keep="first").set_index(key, drop=False).loc[uniques]
    tok = tokenize_prompts(PromptBuilder(text_fields).build(first[text_fields].reset_index(drop=True)),
                           tokenizer, max_length)
    return tok, codes.astype(np.int32)


def distinct_vectors(values, key: str, text_fields: list[str], language_model: LanguageModel, tokenizer,
                     max_length: int, folder: Path | None, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(table (K, H) float32, index (N,) int32)``: the ``[CLS]`` vector of each distinct text
    of :func:`distinct_texts`, computed once per value and cached in ``folder`` (when given),
    and each row's value."""
    path = None
    if folder is not None:
        digest = hashlib.sha256(json.dumps([key, text_fields, max_length, weights_fingerprint(language_model)])
                                .encode()).hexdigest()[:16]
        path = Path(folder) / f"distinct-{digest}.npz"
        if path.exists():
            cached = np.load(path)
            return cached["table"], cached["index"]
    tick = time.perf_counter()
    tok, index = distinct_texts(values, key, text_fields, tokenizer, max_length)
    table = sharded_sentence_vectors(language_model, tok.input_ids, tok.lengths, batch_size)
    log.info("text vectors of %d distinct %s values: %.0f s", len(table), key, time.perf_counter() - tick)
    _save_on_main(path, lambda fh: np.savez(fh, table=table, index=index))
    return table, index


def side_tables(values, sides: dict[str, tuple[str, list[str]]], tokenizer, max_length: int,
                frozen: LanguageModel | None, folder: Path | None = None, batch_size: int = 256
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, np.ndarray]]:
    """MoRec's item text, CTR-BERT's user and item towers: ``(tables, index)``, per side
    (its key field and text fields) the arguments of its ``SideText`` — with a ``frozen``
    encoder the vectors (K, H) of every distinct user's / item's text (cached in ``folder`` when
    given), else that text tokenized (K, L), cut to the longest — and each row's user / item (N,)."""
    tables, index = {}, {}
    for side, (key, fields) in sides.items():
        if frozen is not None:
            table, index[side] = distinct_vectors(values, key, fields, frozen, tokenizer, max_length, folder,
                                                  batch_size)
            tables[side] = {"vectors": torch.from_numpy(table)}
        else:
            tok, index[side] = distinct_texts(values, key, fields, tokenizer, max_length)
            width = int(tok.lengths.max())
            tables[side] = {"tokens": torch.from_numpy(tok.input_ids[:, :width]),
                            "lengths": torch.from_numpy(tok.lengths)}
    return tables, index
