"""CTR-BERT (PLM baseline): two text towers, late fusion.

The user-side fields (ID, gender, age, ...) and the item-side fields (ID, title, genre, ...) are
written as two prompts and encoded apart by the language model (``[CLS]``; one encoder shared
by both towers); each tower's vector is projected by its own linear map, and a small MLP over
the two projections gives the logit. No ID embedding takes part: the model sees the sample
only through text.

With a frozen encoder a tower's vector depends on the user (item) alone, so it is computed
once per distinct user (item) and read from a table; a trained encoder runs in every step.

Shapes: B batch, H text hidden size, D tower size, U / I distinct users / items.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .contract import CTRModule, CTROutput
from .language import LanguageModel
from .layers import MLP, init_weights
from .text_sides import SideText, text_lr_groups


class CTRBertModel(CTRModule):
    """``t_u``, ``t_i`` (B, H): the towers' text vectors of each row's user and item
    (:class:`SideText`); ``h = [W_u t_u + b_u ⊕ W_i t_i + b_i]`` (B, 2D); ``logit = wᵀ MLP(h) + b``.
    A trained language model learns at ``text_lr_scale`` times the towers' lr."""

    input_names = ("user_index", "item_index")
    default_eval_batch_size = 8192

    def __init__(self, config: ModelConfig, user: SideText, item: SideText,
                 language_model: LanguageModel | None = None, text_lr_scale: float = 1.0):
        super().__init__()
        self.user_text, self.item_text = user, item
        self.language_model, self.text_lr_scale = language_model, text_lr_scale
        hidden = language_model.hidden_size if language_model is not None else user.vectors.shape[1]
        if language_model is not None:
            self.default_eval_batch_size = 256
        self.user_tower = nn.Linear(hidden, config.embedding_dim)
        self.item_tower = nn.Linear(hidden, config.embedding_dim)
        self.mlp = MLP(2 * config.embedding_dim, config.dnn_hidden, config.dropout, config.batch_norm)
        self.head = nn.Linear(self.mlp.output_dim, 1)
        for module in (self.user_tower, self.item_tower, self.mlp, self.head):
            module.apply(init_weights)

    def lr_groups(self) -> list[dict]:
        return text_lr_groups(self.language_model, self.text_lr_scale)

    def forward(self, user_index: torch.Tensor, item_index: torch.Tensor) -> CTROutput:
        """user_index, item_index (B,) -> logits (B,); representation = the fused towers (B, 2D)."""
        h = torch.cat([self.user_tower(self.user_text(user_index, self.language_model)),
                       self.item_tower(self.item_text(item_index, self.language_model))], -1)
        return CTROutput(self.head(self.mlp(h)).squeeze(-1), h)
