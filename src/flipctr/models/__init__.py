"""Models: ID backbones, the language model, and the CTR models built from them."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from ..data.encoder import FeatureMap
from .backbones import MODELS, build_model


def build_ctr_model(config: ModelConfig, feature_map: FeatureMap) -> nn.Module:
    """An ID backbone by name, or ``plm``: the language-model-only CTR model."""
    if config.name.lower() == "plm":
        from .language import LanguageModel
        from .plm import PLMCTRModel

        language_model = LanguageModel.from_pretrained(config.plm)
        language_model.freeze(config.plm_trainable_layers)
        return PLMCTRModel(language_model)
    return build_model(config, feature_map)


__all__ = ["MODELS", "build_ctr_model", "build_model"]
