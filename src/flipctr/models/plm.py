"""PLM-only CTR model: ``p = σ(wᵀ [CLS] + b)``, finetuned end to end (FLIP_PLM without
pretraining; the single-tower CTR-BERT-style baseline)."""

from __future__ import annotations

import torch
from torch import nn

from .contract import CTRModule, CTROutput
from .language import LanguageModel

TEXT_INPUTS = ("input_ids", "attention_mask")
TEXT_VECTOR_INPUTS = ("text_cls",)  # precomputed [CLS] vectors of a frozen language model


def text_vector(language_model: LanguageModel | None, input_ids: torch.Tensor | None,
                attention_mask: torch.Tensor | None, text_cls: torch.Tensor | None) -> torch.Tensor:
    """The sentence vector (B, H): the encoder's ``[CLS]``, or the precomputed ``text_cls``
    when the model holds no encoder (a frozen one is then run once per row, not per epoch)."""
    if language_model is None:
        return text_cls
    return language_model(input_ids, attention_mask).cls


class PLMCTRModel(CTRModule):
    default_eval_batch_size = 256

    def __init__(self, language_model: LanguageModel | None, hidden_size: int | None = None):
        """``language_model=None``: read precomputed ``text_cls`` vectors of size ``hidden_size``."""
        super().__init__()
        self.language_model = language_model
        self.input_names = TEXT_INPUTS if language_model is not None else TEXT_VECTOR_INPUTS
        self.head = nn.Linear(language_model.hidden_size if language_model is not None else hidden_size, 1)
        nn.init.xavier_normal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                text_cls: torch.Tensor | None = None) -> CTROutput:
        """input_ids, attention_mask (B, L) or text_cls (B, H) -> logits (B,), representation = [CLS] (B, H)."""
        cls = text_vector(self.language_model, input_ids, attention_mask, text_cls)
        return CTROutput(self.head(cls).squeeze(-1), cls)
