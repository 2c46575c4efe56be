"""The language model side: any Hugging Face encoder (its files found by
:func:`~flipctr.data.lm_files.resolve_language_model`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..data.lm_files import resolve_language_model
from .contract import LMOutput

MASK_KINDS = ("auto", "2d", "4d")


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 padding mask -> (B, 1, 1, L) additive mask in ``dtype``: 0 where a token is
    attended, the dtype's lowest value where it is padding (what transformers builds from the 2-D
    mask for eager and SDPA attention alike, without looking at its values)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class LanguageModel(nn.Module):
    """A Hugging Face encoder (BERT/RoBERTa family); ``[CLS]`` (first token) is the sentence vector.

    ``attention_mask``: how the padding mask reaches the encoder. "2d": as it is, and transformers
    turns it into a 4-D mask, first asking whether any token is padding (``mask.all()``: on a GPU
    a wait for the device in every forward); "4d": an :func:`additive_mask` built here, which
    transformers takes as it is (no wait); "auto": "4d" on CUDA, "2d" elsewhere."""

    input_names = ("input_ids", "attention_mask")

    def __init__(self, encoder: nn.Module, attention_mask: str = "auto"):
        super().__init__()
        if attention_mask not in MASK_KINDS:
            raise ValueError(f"model.plm_attention_mask must be one of {MASK_KINDS}, not {attention_mask!r}")
        self.encoder = encoder
        self.hidden_size: int = encoder.config.hidden_size
        self.attention_mask = attention_mask

    @staticmethod
    def mask_kind(setting: str, device: torch.device) -> str:
        """The mask a ``setting`` gives on ``device`` ("2d" or "4d")."""
        return ("4d" if device.type == "cuda" else "2d") if setting == "auto" else setting

    @classmethod
    def from_pretrained(cls, name: str, attention_mask: str = "auto") -> "LanguageModel":
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        path = resolve_language_model(name)
        if Path(path).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the checkpoint's pooler weights are unused on purpose
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            encoder = AutoModel.from_pretrained(path, local_files_only=Path(path).is_dir(), add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        # transformers keeps a checkpoint's stored dtype: a bf16 copy (the GPU pack) would train
        # with bf16 master weights. Master weights are fp32; autocast decides the compute dtype.
        return cls(encoder.float(), attention_mask)

    @classmethod
    def from_config(cls, config, attention_mask: str = "auto") -> "LanguageModel":
        """A randomly initialised encoder from a ``transformers`` config (tests, ablations)."""
        from transformers import AutoModel

        return cls(AutoModel.from_config(config, add_pooling_layer=False), attention_mask)

    def freeze(self, trainable_top_layers: int | None = None) -> None:
        """Freeze the encoder except its top ``trainable_top_layers`` layers (None: all trainable)."""
        if trainable_top_layers is None:
            return
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        layers = self.encoder.encoder.layer
        for layer in layers[len(layers) - trainable_top_layers:] if trainable_top_layers else []:
            for p in layer.parameters():
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> "LanguageModel":
        # a frozen encoder is a fixed feature extractor: no dropout, the same states in every pass
        return super().train(mode and self.trainable)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.encoder.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LMOutput:
        # a frozen encoder builds no graph: its states are constants for the heads above it
        if self.mask_kind(self.attention_mask, input_ids.device) == "4d":
            device_type = input_ids.device.type
            dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else self.encoder.get_input_embeddings().weight.dtype)
            attention_mask = additive_mask(attention_mask, dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return LMOutput(hidden, hidden[:, 0])

    @torch.no_grad()
    def sentence_vectors(self, input_ids: torch.Tensor, lengths: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``[CLS]`` of every row, (N, L) token ids -> (N, H) float32. Rows run in order of
        length, each batch padded to its longest row (little padding)."""
        self.eval()
        device = next(self.encoder.parameters()).device
        order = torch.argsort(lengths, stable=True)
        out = torch.empty(len(input_ids), self.hidden_size)
        for start in range(0, len(input_ids), batch_size):
            rows = order[start:start + batch_size]
            lens = lengths[rows].to(device)
            width = int(lens.max())
            ids = input_ids[rows, :width].to(device)
            mask = (torch.arange(width, device=device) < lens[:, None]).long()
            out[rows] = self(ids, mask).cls.float().cpu()
        return out
