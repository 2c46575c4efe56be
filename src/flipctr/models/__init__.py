"""Models: ID backbones, the language model, and the CTR models built from them."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..config import ModelConfig
from ..data.encoder import FeatureMap
from .backbones import MODELS, build_model


def build_ctr_model(config: ModelConfig, feature_map: FeatureMap, id_lr_scale: float = 1.0) -> nn.Module:
    """An ID backbone by name; ``plm``: the language-model-only CTR model; ``flip``: the joint
    FLIP model over ``config.backbone`` and the language model. With ``plm_trainable_layers=0``
    the encoder is frozen and left out: the model reads its ``text_cls`` vectors."""
    name = config.name.lower()
    if name in ("plm", "flip"):
        from .language import LanguageModel

        language_model = LanguageModel.from_pretrained(config.plm)
        language_model.freeze(config.plm_trainable_layers)
        hidden_size = language_model.hidden_size
        if not language_model.trainable:
            language_model = None  # a frozen encoder: the model reads its precomputed text vectors
        if name == "plm":
            from .plm import PLMCTRModel

            return PLMCTRModel(language_model, hidden_size)
        from .flip import FlipCTRModel

        backbone = build_model(dataclasses.replace(config, name=config.backbone), feature_map)
        return FlipCTRModel(backbone, language_model, id_lr_scale=id_lr_scale, hidden_size=hidden_size)
    return build_model(config, feature_map)


__all__ = ["MODELS", "build_ctr_model", "build_model"]
