"""Sentence vectors (``[CLS]``) of a frozen language model, computed once per row range and
cached beside the tokenized prompts.

A frozen encoder gives every model the same vectors, so FLIP_PLM, FLIP and every seed share
one pass over each row range instead of one per epoch and per model. The cache key is a
hash of the encoder's weights and the dtype it ran in.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..data.text import TokenizedPrompts
from ..models.language import LanguageModel
from ..utils import atomic_path

log = logging.getLogger("flipctr")


def weights_fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class TextVectors:
    """``vectors(start, stop) -> (stop - start, H) float32``: ``[CLS]`` of rows [start, stop)."""

    def __init__(self, language_model: LanguageModel, text: TokenizedPrompts, device: torch.device,
                 dtype: torch.dtype | None = None, batch_size: int = 256, folder: Path | None = None):
        if language_model.trainable:
            raise ValueError("cached text vectors need a frozen language model (model.plm_trainable_layers=0)")
        self.text, self.device, self.batch_size = text, device, batch_size
        self.hidden_size = language_model.hidden_size
        key = f"{weights_fingerprint(language_model)}-{str(dtype or torch.float32).split('.')[-1]}"
        root = folder or text.folder
        self.folder = None if root is None else Path(root) / f"cls-{key}"
        self.language_model = copy.deepcopy(language_model).to(device=device, dtype=dtype)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        path = None if self.folder is None else self.folder / f"{start}-{stop}.npy"
        if path is not None and path.exists():
            return np.load(path)
        tick = time.perf_counter()
        vectors = self.language_model.sentence_vectors(
            torch.from_numpy(np.array(self.text.input_ids[start:stop])),
            torch.from_numpy(np.array(self.text.lengths[start:stop])), self.batch_size).numpy()
        log.info("text vectors of rows [%d, %d): %.0f s (%.0f rows/s)", start, stop, time.perf_counter() - tick,
                 (stop - start) / max(time.perf_counter() - tick, 1e-9))
        if path is not None:
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, vectors)
        return vectors
