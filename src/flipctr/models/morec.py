"""MoRec (ID+PLM baseline): an ID model with each item's text, encoded by a language model,
as one more field of the feature interaction.

The item's prompt (its describing fields, e.g. ML-1M's title and genre) is encoded once per
distinct item by a frozen language model (``[CLS]``); a learned projection maps that vector to
the embedding size, and the backbone sees it as an extra field beside the ID fields.

Shapes: B batch, F ID fields, D embedding size, H text hidden size, I distinct items.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ModelConfig
from ..data.encoder import FeatureMap, FieldInfo
from .backbones import CTRModel, CTROutput, build_model


class MoRecModel(nn.Module):
    """``item_table`` (I, H): the items' text vectors (a frozen buffer, rebuilt from the cached
    vectors when a run is loaded, not saved with the weights); input ``item_index`` (B,) picks
    each row's item."""

    input_names = ("ids", "item_index")
    default_lr = 1e-3
    default_eval_batch_size = 8192

    def __init__(self, config: ModelConfig, feature_map: FeatureMap, item_table: torch.Tensor):
        super().__init__()
        # the backbone gets one more field, whose embedding is the projected item text
        extra = FieldInfo("item text", feature_map.num_features, 1)
        widened = dataclasses.replace(feature_map, fields=[*feature_map.fields, extra],
                                      num_features=feature_map.num_features + 1)
        self.backbone: CTRModel = build_model(dataclasses.replace(config, name=config.backbone), widened)
        self.register_buffer("item_table", item_table.float(), persistent=False)
        self.project = nn.Linear(item_table.shape[1], config.embedding_dim)
        nn.init.xavier_normal_(self.project.weight)
        nn.init.zeros_(self.project.bias)
        self.text_id = extra.offset

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The ID fields' embeddings (B, F, D) (``train.embedding_l2``)."""
        return self.backbone.embedding(ids)

    def forward(self, ids: torch.Tensor, item_index: torch.Tensor) -> CTROutput:
        """ids (B, F), item_index (B,) -> logits (B,)."""
        text = self.project(self.item_table[item_index.long()])  # (B, D)
        ids = torch.cat([ids, torch.full_like(ids[:, :1], self.text_id)], 1)
        self.backbone.dense_fields = text[:, None, :]
        try:
            v = self.backbone.encode(ids)
        finally:
            self.backbone.dense_fields = None
        return CTROutput(self.backbone.logit(v), v)
