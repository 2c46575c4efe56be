"""What every model hands the loops that train, evaluate and serve it: the outputs, and the CTR
model contract (:class:`CTRModule`) that the trainer, the run protocol and inference read."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CTROutput:
    logits: torch.Tensor  # (B,)
    representation: torch.Tensor  # (B, H)
    aux_logits: tuple[torch.Tensor, ...] = ()  # extra heads, each trained with its own BCE (FLIP Eq. 15)


@dataclass
class LMOutput:
    hidden_states: torch.Tensor  # (B, L, H) last layer
    cls: torch.Tensor  # (B, H) first token ([CLS]) of the last layer: the sentence vector


@dataclass
class PretrainOutput:
    loss: torch.Tensor
    mlm: torch.Tensor | None = None
    mtm: torch.Tensor | None = None
    icl: torch.Tensor | None = None
    text_fields_lost: torch.Tensor | int = 0


class CTRModule(nn.Module):
    """Base of every CTR model: ``forward(**inputs) -> CTROutput``, where ``inputs`` are the
    arrays named by ``input_names`` (ID models: ``ids``; text models: ``input_ids`` and
    ``attention_mask``, or a frozen encoder's ``text_cls``; text-side models: ``user_index``,
    ``item_index``)."""

    input_names: tuple[str, ...] = ("ids",)
    default_eval_batch_size: int = 8192

    def lr_groups(self) -> list[dict]:
        """Parameter groups that train at their own multiple of the base lr:
        ``[{"params": [...], "lr_scale": s}]``; the rest train at the base lr."""
        return []

    def summary(self) -> dict[str, float]:
        """What a run reports about the trained model beside its metrics (``metrics.json``)."""
        return {}
