"""PLM-only CTR model: ``p = σ(wᵀ [CLS] + b)``, finetuned end to end (FLIP_PLM without
pretraining; the single-tower CTR-BERT-style baseline)."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import CTROutput
from .language import LanguageModel


class PLMCTRModel(nn.Module):
    input_names = ("input_ids", "attention_mask")
    default_lr = 5e-5
    default_eval_batch_size = 256

    def __init__(self, language_model: LanguageModel):
        super().__init__()
        self.language_model = language_model
        self.head = nn.Linear(language_model.hidden_size, 1)
        nn.init.xavier_normal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> CTROutput:
        """input_ids, attention_mask (B, L) -> logits (B,), representation = [CLS] (B, H)."""
        cls = self.language_model(input_ids, attention_mask).cls
        return CTROutput(self.head(cls).squeeze(-1), cls)
