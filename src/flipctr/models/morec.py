"""MoRec (ID+PLM baseline): an ID model with each item's text, encoded by a language model,
as one more field of the feature interaction.

The item's prompt (its describing fields, e.g. ML-1M's title and genre) is encoded by the
language model (``[CLS]``; frozen: once per distinct item, trained: in every step, end to end);
a learned projection maps that vector to the embedding size, and the backbone sees it as an
extra field beside the ID fields.

Shapes: B batch, F ID fields, D embedding size, H text hidden size, I distinct items.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ModelConfig
from ..data.encoder import FeatureMap, FieldInfo
from .backbones import CTRModel, build_model
from .contract import CTRModule, CTROutput
from .language import LanguageModel
from .text_sides import SideText, text_lr_groups


class MoRecModel(CTRModule):
    """``item``: the items' text (:class:`SideText`: cached vectors of a frozen encoder, or tokens
    that ``language_model`` encodes); input ``item_index`` (B,) picks each row's item. A trained
    language model learns at ``text_lr_scale`` times the ID side's lr."""

    input_names = ("ids", "item_index")
    default_eval_batch_size = 8192

    def __init__(self, config: ModelConfig, feature_map: FeatureMap, item: SideText,
                 language_model: LanguageModel | None = None, text_lr_scale: float = 1.0):
        super().__init__()
        # the backbone gets one more field, whose embedding is the projected item text
        extra = FieldInfo("item text", feature_map.num_features, 1)
        widened = dataclasses.replace(feature_map, fields=[*feature_map.fields, extra],
                                      num_features=feature_map.num_features + 1)
        self.backbone: CTRModel = build_model(dataclasses.replace(config, name=config.backbone), widened)
        self.item_text, self.language_model, self.text_lr_scale = item, language_model, text_lr_scale
        hidden = language_model.hidden_size if item.trained else item.vectors.shape[1]
        self.project = nn.Linear(hidden, config.embedding_dim)
        if language_model is not None:
            self.default_eval_batch_size = 256
        nn.init.xavier_normal_(self.project.weight)
        nn.init.zeros_(self.project.bias)
        self.text_id = extra.offset

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The ID fields' embeddings (B, F, D) (``train.embedding_l2``)."""
        return self.backbone.embedding(ids)

    def lr_groups(self) -> list[dict]:
        return text_lr_groups(self.language_model, self.text_lr_scale)

    def forward(self, ids: torch.Tensor, item_index: torch.Tensor) -> CTROutput:
        """ids (B, F), item_index (B,) -> logits (B,)."""
        text = self.project(self.item_text(item_index, self.language_model))  # (B, D)
        ids = torch.cat([ids, torch.full_like(ids[:, :1], self.text_id)], 1)
        v = self.backbone.encode(ids, dense_fields=text[:, None, :])
        return CTROutput(self.backbone.logit(v), v)
