"""Models: ID backbones, the language model, and the CTR models built from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..data.encoder import FeatureMap
from ..data.lm_files import hidden_size
from .backbones import MODELS, build_model
from .contract import CTRModule
from .ctr_bert import CTRBertModel
from .flip import FlipCTRModel
from .language import LanguageModel
from .morec import MoRecModel
from .plm import PLMCTRModel
from .text_sides import SideText


def text_encoder(config: ModelConfig, state: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module | None, int]:
    """The one decision on the text side of a CTR model: ``(language model, hidden size)``, the
    model loaded from ``state`` when given, with its top ``plm_trainable_layers`` layers
    trainable; or ``(None, hidden size)`` when it is frozen (``plm_trainable_layers=0``): a
    frozen encoder is left out of the CTR models, which read its ``text_cls`` vectors, computed
    once per row range and cached."""
    if config.plm_trainable_layers == 0:
        return None, hidden_size(config.plm)
    language_model = LanguageModel.from_pretrained(config.plm, config.plm_attention_mask)
    if state is not None:
        language_model.load_state_dict(state)
    language_model.freeze(config.plm_trainable_layers)
    return language_model, language_model.hidden_size


# models that read the text of a sample's user / item (``sides``, see ``text_sides.SideText``):
# side -> whether the side's key (the user or item ID) is part of its text; MoRec's item ID is a field.
TEXT_SIDES = {"morec": {"item": False}, "ctr_bert": {"user": True, "item": True}}


@dataclass(frozen=True)
class LrScales:
    """Learning rates of a model's parameter groups as multiples of its base lr (the trainer's):
    the joint FLIP model's ID backbone and α, a language model inside an ID-side model. A run's
    ratios are decided by :func:`flipctr.training.optim.lr_scales`."""

    id: float = 1.0
    alpha: float = 1.0
    text: float = 1.0


def build_ctr_model(config: ModelConfig, feature_map: FeatureMap, sides: dict[str, dict[str, torch.Tensor]] | None = None,
                    scales: LrScales = LrScales(), text_state: dict[str, torch.Tensor] | None = None) -> CTRModule:
    """The one builder of every CTR model (its lr groups included). An ID backbone by name;
    ``plm``: the language-model-only CTR model; ``flip``: the joint FLIP model over
    ``config.backbone`` and the language model (see :func:`text_encoder`; ``text_state``: the
    language model's weights to start from, e.g. pretrained); ``morec``: ``config.backbone``
    with the items' text as a field; ``ctr_bert``: two text towers. ``sides``: per side of
    :data:`TEXT_SIDES` the arguments of its :class:`~.text_sides.SideText` (cached ``vectors``
    for a frozen encoder, ``tokens`` and ``lengths`` for a trained one, which learns at
    ``scales.text`` times the model's lr)."""
    name = config.name.lower()
    if name in TEXT_SIDES:
        needs = list(TEXT_SIDES[name])
        if set(needs) - set(sides or {}):
            raise ValueError(f"{name} needs the text of its sides {needs} (sides)")
        text = {side: SideText(**sides[side]) for side in needs}
        language_model = text_encoder(config)[0]
        if (language_model is None) == text[needs[0]].trained:
            raise ValueError(f"{name}: a trained encoder reads the sides' tokens, a frozen one their vectors")
        if name == "morec":
            return MoRecModel(config, feature_map, text["item"], language_model, scales.text)
        return CTRBertModel(config, text["user"], text["item"], language_model, scales.text)
    if name in ("plm", "flip"):
        language_model, hidden_size = text_encoder(config, text_state)
        if name == "plm":
            return PLMCTRModel(language_model, hidden_size)
        backbone = build_model(dataclasses.replace(config, name=config.backbone), feature_map)
        return FlipCTRModel(backbone, language_model, id_lr_scale=scales.id, hidden_size=hidden_size,
                            alpha_lr_scale=scales.alpha)
    return build_model(config, feature_map)


__all__ = ["MODELS", "TEXT_SIDES", "CTRModule", "LrScales", "build_ctr_model", "build_model", "text_encoder"]
