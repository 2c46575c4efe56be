"""ID-based CTR backbones with one interface.

Every backbone maps global feature ids ``(B, F)`` to

- ``embed(ids)  -> (B, F, D)``  per-field embeddings (shared table ``self.embedding``),
- ``encode(ids) -> v (B, H)``   the dense representation FLIP aligns with the language model
                                 (the last hidden layer(s) before the logit),
- ``logit(v)    -> (B,)``       the click logit.

``forward(ids)`` returns :class:`CTROutput` with both.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..data.encoder import FeatureMap
from .contract import CTRModule, CTROutput
from .layers import (
    CIN,
    MLP,
    AttentionalPooling,
    CrossNetMix,
    CrossNetV1,
    CrossNetV2,
    InnerProduct,
    InteractingLayer,
    LogarithmicTransformation,
    fm_interaction,
    init_weights,
)


class CTRModel(CTRModule):
    """Base of the ID backbones: the shared embedding table and the encode/logit split."""

    def __init__(self, config: ModelConfig, feature_map: FeatureMap):
        super().__init__()
        self.config = config
        self.num_fields = feature_map.num_fields
        self.embedding_dim = config.embedding_dim
        self.embedding = nn.Embedding(feature_map.num_features, config.embedding_dim)
        self.output_dim = 0  # set by subclasses: size of v

    def post_init(self) -> None:
        self.apply(init_weights)

    def _dnn(self, in_dim: int | None = None) -> MLP:
        """The DNN tower as configured; its input defaults to the flat embeddings (F·D)."""
        c = self.config
        return MLP(in_dim or self.num_fields * c.embedding_dim, c.dnn_hidden, c.dropout, c.batch_norm)

    def embed(self, ids: torch.Tensor, dense_fields: torch.Tensor | None = None) -> torch.Tensor:
        """(B, F) ids -> (B, F, D). ``dense_fields`` (B, E, D) (MoRec's projected item text)
        replace the embeddings of the last E fields, so every backbone's feature interaction
        sees them as fields of their own."""
        emb = self.embedding(ids)
        if dense_fields is None:
            return emb
        return torch.cat([emb[:, :emb.shape[1] - dense_fields.shape[1]], dense_fields.to(emb.dtype)], 1)

    def encode(self, ids: torch.Tensor, dense_fields: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def logit(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor) -> CTROutput:
        v = self.encode(ids)
        return CTROutput(self.logit(v), v)


class LinearHead(CTRModel):
    """Backbones whose logit is one linear layer on ``v``."""

    def _make_head(self, dim: int) -> None:
        self.output_dim = dim
        self.head = nn.Linear(dim, 1)

    def logit(self, v: torch.Tensor) -> torch.Tensor:
        return self.head(v).squeeze(-1)


class FirstOrderMixin:
    """``v`` starts with a first-order (wide/linear) term ``Σ_f w_{x_f}``, added straight to the logit."""

    def _make_first_order(self, feature_map: FeatureMap) -> None:
        self.first_order = nn.Embedding(feature_map.num_features, 1)

    def _first_order(self, ids: torch.Tensor) -> torch.Tensor:
        return self.first_order(ids).sum(1)  # (B, 1)


class DCNv2(LinearHead):
    """DCNv2: cross network (full-rank or low-rank mixture) and DNN, parallel or stacked.

    parallel: ``v = [cross(x0) ; dnn(x0)]``; stacked: ``v = dnn(cross(x0))``; ``x0`` = flat embeddings.
    """

    def __init__(self, config: ModelConfig, feature_map: FeatureMap):
        super().__init__(config, feature_map)
        dim = self.num_fields * config.embedding_dim
        if config.cross_variant == "full":
            self.cross = CrossNetV2(dim, config.cross_layers)
        elif config.cross_variant == "mix":
            self.cross = CrossNetMix(dim, config.cross_layers, config.cross_experts, config.cross_rank)
        else:
            raise ValueError(f"model.cross_variant must be 'full' or 'mix', not {config.cross_variant!r}")
        if config.structure not in ("parallel", "stacked"):
            raise ValueError(f"model.structure must be 'parallel' or 'stacked', not {config.structure!r}")
        self.dnn = self._dnn()
        self._make_head(dim + self.dnn.output_dim if config.structure == "parallel" else self.dnn.output_dim)
        self.post_init()

    def encode(self, ids: torch.Tensor, dense_fields: torch.Tensor | None = None) -> torch.Tensor:
        x0 = self.embed(ids, dense_fields).flatten(1)
        if self.config.structure == "stacked":
            return self.dnn(self.cross(x0))
        return torch.cat([self.cross(x0), self.dnn(x0)], dim=-1)


class DCN(LinearHead):
    """DCN: ``v = [crossV1(x0) ; dnn(x0)]``."""

    def __init__(self, config: ModelConfig, feature_map: FeatureMap):
        super().__init__(config, feature_map)
        dim = self.num_fields * config.embedding_dim
        self.cross = CrossNetV1(dim, config.cross_layers)
        self.dnn = self._dnn()
        self._make_head(dim + self.dnn.output_dim)
        self.post_init()

    def encode(self, ids: torch.Tensor, dense_fields: torch.Tensor | None = None) -> torch.Tensor:
        x0 = self.embed(ids, dense_fields).flatten(1)
        return torch.cat([self.cross(x0), self.dnn(x0)], dim=-1)


class DeepFM(FirstOrderMixin, CTRModel):
    """DeepFM: ``logit = Σ_f w_f + Σ_d fm_d + wᵀ dnn(x0) + b``; ``v = [first order ; fm ; dnn]``."""

    def __init__(self, config: ModelConfig, feature_map: FeatureMap):
        super().__init__(config, feature_map)
        self._make_first_order(feature_map)
        self.dnn = self._dnn()
        self.dnn_out = nn.Linear(self.dnn.output_dim, 1)
        self.output_dim = 1 + config.embedding_dim + self.dnn.output_dim
        self.post_init()

    def encode(self, ids: torch.Tensor, dense_fields: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(ids, dense_fields)
        return torch.cat([self._first_order(ids), fm_interaction(emb), self.dnn(emb.flatten(1))], dim=-1)

    def logit(self, v: torch.Tensor) -> torch.Tensor:
        d = self.embedding_dim
        return v[:, 0] + v[:, 1:1 + d].sum(-1) + self.dnn_out(v[:, 1 + d:]).squeeze(-1)


class WideDeep(FirstOrderMixin, CTRModel):
    """Wide & Deep: ``logit = Σ_f w_f + wᵀ dnn(x0) + b``; ``v = [wide ; dnn]``."""

    def __init__(self, config: ModelConfig, feature_map: FeatureMap):
        super().__init__(config, feature_map)
        self._make_first_order(feature_map)
        self.dnn = self._dnn()
        self.dnn_out = nn.Linear(self.dnn.output_dim, 1)
        self.output_dim = 1 + self.dnn.output_dim
        self.post_init()

    def encode(self, ids: torch.Tensor, dense_fields: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([self._first_order(ids), self.dnn(self.embed(ids, dense_fields).flatten(1))], dim=-1)

    def logit(self, v: torch.Tensor) -> torch.Tensor:
        return v[:, 0] + self.dnn_out(v[:, 1:]).squeeze(-1)


class AFM(FirstOrderMixin, CTRModel):
    """AFM: ``logit = Σ_f w_f + pᵀ AttentionalPooling(e) + b``; ``v = [first order ; pooled]``."""

    def __init__(self, config: ModelConfig, feature_map: FeatureMap):
        super().__init__(config, feature_map)
        self._make_first_order(feature_map)
        self.pooling = AttentionalPooling(self.num_fields, config.embedding_dim, config.afm_attention_dim,
                                          config.dropout)
        self.projection = nn.Linear(config.embedding_dim, 1)
        self.output_dim = 1 + config.embedding_dim
        self.post_init()

    def encode(self, ids: torch.Tensor, dense_fields: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([self._first_order(ids), self.pooling(self.embed(ids, dense_fields))], dim=-1)

    def logit(self, v: torch.Tensor) -> torch.Tensor:
        return v[:, 0] + self.projection(v[:, 1:]).squeeze(-1)


class PNN(LinearHead):
    """Inner-product PNN: ``v = dnn([x0 ; <e_i, e_j>_{i<j}])``."""

    def __init__(self, config: ModelConfig, feature_map: FeatureMap):
        super().__init__(config, feature_map)
        self.product = InnerProduct(self.num_fields)
        pairs = self.num_fields * (self.num_fields - 1) // 2
        self.dnn = self._dnn(self.num_fields * config.embedding_dim + pairs)
        self._make_head(self.dnn.output_dim)
        self.post_init()

    def encode(self, ids: torch.Tensor, dense_fields: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(ids, dense_fields)
        return self.dnn(torch.cat([emb.flatten(1), self.product(emb)], dim=-1))


class XDeepFM(FirstOrderMixin, CTRModel):
    """xDeepFM: ``logit = Σ_f w_f + w_cᵀ CIN(e) + w_dᵀ dnn(x0) + b``; ``v = [first order ; CIN ; dnn]``."""

    def __init__(self, config: ModelConfig, feature_map: FeatureMap):
        super().__init__(config, feature_map)
        self._make_first_order(feature_map)
        self.cin = CIN(self.num_fields, config.cin_layers)
        self.dnn = self._dnn()
        self.head = nn.Linear(self.cin.output_dim + self.dnn.output_dim, 1)
        self.output_dim = 1 + self.cin.output_dim + self.dnn.output_dim
        self.post_init()

    def encode(self, ids: torch.Tensor, dense_fields: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(ids, dense_fields)
        return torch.cat([self._first_order(ids), self.cin(emb), self.dnn(emb.flatten(1))], dim=-1)

    def logit(self, v: torch.Tensor) -> torch.Tensor:
        return v[:, 0] + self.head(v[:, 1:]).squeeze(-1)


class AutoInt(LinearHead):
    """AutoInt: stacked multi-head self-attention over fields; ``v = flatten(attn^L(e))``
    (with ``autoint_dnn``: ``v = [flatten ; dnn(x0)]``, i.e. AutoInt+)."""

    def __init__(self, config: ModelConfig, feature_map: FeatureMap):
        super().__init__(config, feature_map)
        dims = [config.embedding_dim] + [config.attention_dim] * config.attention_layers
        self.attention = nn.Sequential(*(
            InteractingLayer(d_in, config.attention_dim, config.attention_heads, config.attention_residual)
            for d_in in dims[:-1]))
        out = self.num_fields * dims[-1]
        self.dnn = (self._dnn() if config.autoint_dnn else None)
        self._make_head(out + (self.dnn.output_dim if self.dnn is not None else 0))
        self.post_init()

    def encode(self, ids: torch.Tensor, dense_fields: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(ids, dense_fields)
        v = self.attention(emb).flatten(1)
        if self.dnn is not None:
            v = torch.cat([v, self.dnn(emb.flatten(1))], dim=-1)
        return v


class AFN(LinearHead):
    """AFN: ``v = dnn(LogarithmicTransformation(e))``."""

    def __init__(self, config: ModelConfig, feature_map: FeatureMap):
        super().__init__(config, feature_map)
        self.log_layer = LogarithmicTransformation(self.num_fields, config.afn_log_neurons)
        self.dnn = self._dnn(config.afn_log_neurons * config.embedding_dim)
        self._make_head(self.dnn.output_dim)
        self.post_init()

    def encode(self, ids: torch.Tensor, dense_fields: torch.Tensor | None = None) -> torch.Tensor:
        return self.dnn(self.log_layer(self.embed(ids, dense_fields)))


MODELS: dict[str, type[CTRModel]] = {
    "dcnv2": DCNv2, "dcn": DCN, "deepfm": DeepFM, "widedeep": WideDeep, "afm": AFM,
    "pnn": PNN, "xdeepfm": XDeepFM, "autoint": AutoInt, "afn": AFN,
}


def build_model(config: ModelConfig, feature_map: FeatureMap) -> CTRModel:
    name = config.name.lower()
    if name not in MODELS:
        raise ValueError(f"unknown model {config.name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](config, feature_map)
