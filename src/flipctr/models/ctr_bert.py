"""CTR-BERT (PLM baseline): two text towers, late fusion.

The user-side fields (ID, gender, age, ...) and the item-side fields (ID, title, genre, ...) are
written as two prompts and encoded apart by the language model (``[CLS]``); each tower's vector
is projected by its own linear map, and a small MLP over the two projections gives the logit.
No ID embedding takes part: the model sees the sample only through text.

With a frozen encoder a tower's vector depends on the user (item) alone, so it is computed
once per distinct user (item) and read from a table.

Shapes: B batch, H text hidden size, D tower size, U / I distinct users / items.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .backbones import CTROutput
from .layers import MLP, init_weights


class CTRBertModel(nn.Module):
    """``t_u = user_table[user_index]``, ``t_i = item_table[item_index]`` (B, H);
    ``h = [W_u t_u + b_u ⊕ W_i t_i + b_i]`` (B, 2D); ``logit = wᵀ MLP(h) + b``.

    The tables (U, H) and (I, H) are frozen buffers, rebuilt from the cached vectors when a run
    is loaded (not saved with the weights: on BookCrossing they would be hundreds of MB)."""

    input_names = ("user_index", "item_index")
    default_lr = 1e-3
    default_eval_batch_size = 8192

    def __init__(self, config: ModelConfig, user_table: torch.Tensor, item_table: torch.Tensor):
        super().__init__()
        self.register_buffer("user_table", user_table.float(), persistent=False)
        self.register_buffer("item_table", item_table.float(), persistent=False)
        self.user_tower = nn.Linear(user_table.shape[1], config.embedding_dim)
        self.item_tower = nn.Linear(item_table.shape[1], config.embedding_dim)
        self.mlp = MLP(2 * config.embedding_dim, config.dnn_hidden, config.dropout, config.batch_norm)
        self.head = nn.Linear(self.mlp.output_dim, 1)
        self.apply(init_weights)

    def forward(self, user_index: torch.Tensor, item_index: torch.Tensor) -> CTROutput:
        """user_index, item_index (B,) -> logits (B,); representation = the fused towers (B, 2D)."""
        h = torch.cat([self.user_tower(self.user_table[user_index.long()]),
                       self.item_tower(self.item_table[item_index.long()])], -1)
        return CTROutput(self.head(self.mlp(h)).squeeze(-1), h)
