"""Interaction layers shared by the ID backbones. Shapes: B batch, F fields, D embedding dim.

Each layer states its formula. Every ``nn.Linear`` and ``nn.Embedding`` of a backbone is
initialised by :func:`init_weights` (applied once by ``CTRModel.post_init``); the cross nets'
own parameter tensors are initialised in their constructors, at the scale their formula needs.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def init_weights(module: nn.Module, embedding_std: float = 1e-4) -> None:
    """Xavier-normal linear weights, zero biases, small normal embeddings."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=embedding_std)


class MLP(nn.Sequential):
    """``[Linear -> (BatchNorm) -> ReLU -> Dropout] * len(hidden)``; (B, in_dim) -> (B, hidden[-1])."""

    def __init__(self, in_dim: int, hidden: list[int], dropout: float = 0.0, batch_norm: bool = False):
        layers: list[nn.Module] = []
        for width in hidden:
            layers.append(nn.Linear(in_dim, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers += [nn.ReLU(), nn.Dropout(dropout)]
            in_dim = width
        super().__init__(*layers)
        self.output_dim = in_dim


class CrossNetV2(nn.Module):
    """Full-rank cross network (DCNv2): ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l``.

    (B, d) -> (B, d)
    """

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class CrossNetMix(nn.Module):
    """Low-rank mixture of cross experts (DCN-Mix):

    ``x_{l+1} = Σ_i g_i(x_l) · x_0 ⊙ (U_i tanh(C_i tanh(V_iᵀ x_l)) + b_l) + x_l``,
    with ``g = softmax_i(w_iᵀ x_l)``, ``U_i, V_i ∈ R^{d×r}``, ``C_i ∈ R^{r×r}``. (B, d) -> (B, d)
    """

    def __init__(self, dim: int, num_layers: int, num_experts: int = 4, rank: int = 32):
        super().__init__()
        self.V = nn.ParameterList(nn.Parameter(torch.empty(num_experts, dim, rank)) for _ in range(num_layers))
        self.C = nn.ParameterList(nn.Parameter(torch.empty(num_experts, rank, rank)) for _ in range(num_layers))
        self.U = nn.ParameterList(nn.Parameter(torch.empty(num_experts, rank, dim)) for _ in range(num_layers))
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(num_layers))
        self.gates = nn.Linear(dim, num_experts, bias=False)
        for p in itertools.chain(self.V, self.C, self.U):
            nn.init.xavier_normal_(p)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for V, C, U, b in zip(self.V, self.C, self.U, self.bias):
            low = torch.tanh(torch.einsum("bd,edr->ber", x, V))
            low = torch.tanh(torch.einsum("ber,ers->bes", low, C))
            experts = x0.unsqueeze(1) * (torch.einsum("ber,erd->bed", low, U) + b)  # (B, E, d)
            gate = torch.softmax(self.gates(x), dim=-1).unsqueeze(-1)  # (B, E, 1)
            x = (gate * experts).sum(1) + x
        return x


class CrossNetV1(nn.Module):
    """Cross network of DCN: ``x_{l+1} = x_0 (x_lᵀ w_l) + b_l + x_l``. (B, d) -> (B, d)"""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.empty(dim)) for _ in range(num_layers))
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(num_layers))
        for w in self.w:
            nn.init.normal_(w, std=dim ** -0.5)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.w, self.b):
            x = x0 * (x @ w).unsqueeze(-1) + b + x
        return x


def fm_interaction(emb: torch.Tensor) -> torch.Tensor:
    """Second-order FM term per dimension: ``½((Σ_f e_f)² − Σ_f e_f²)``. (B, F, D) -> (B, D)"""
    return 0.5 * (emb.sum(1).pow(2) - emb.pow(2).sum(1))


def pairwise_index(num_fields: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(num_fields, num_fields, offset=1, device=device)
    return rows, cols


class InnerProduct(nn.Module):
    """Pairwise inner products ``<e_i, e_j>`` for i < j (IPNN). (B, F, D) -> (B, F(F-1)/2)"""

    def __init__(self, num_fields: int):
        super().__init__()
        rows, cols = pairwise_index(num_fields)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return (emb[:, self.rows] * emb[:, self.cols]).sum(-1)


class AttentionalPooling(nn.Module):
    """AFM: ``Σ_{i<j} a_ij (e_i ⊙ e_j)``, ``a = softmax(hᵀ ReLU(W (e_i ⊙ e_j) + b))``.

    (B, F, D) -> (B, D)
    """

    def __init__(self, num_fields: int, dim: int, attention_dim: int, dropout: float = 0.0):
        super().__init__()
        rows, cols = pairwise_index(num_fields)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.attention = nn.Sequential(nn.Linear(dim, attention_dim), nn.ReLU(),
                                       nn.Linear(attention_dim, 1, bias=False))
        self.dropout = nn.Dropout(dropout)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        pairs = emb[:, self.rows] * emb[:, self.cols]  # (B, P, D)
        weights = torch.softmax(self.attention(pairs), dim=1)  # (B, P, 1)
        return self.dropout((weights * pairs).sum(1))


class CIN(nn.Module):
    """Compressed interaction network (xDeepFM).

    ``X^k_h = Σ_{i,j} W^{k,h}_{ij} (X^{k-1}_i ⊙ X^0_j)``; each layer's maps are sum-pooled over
    D and concatenated. (B, F, D) -> (B, Σ_k H_k)
    """

    def __init__(self, num_fields: int, layer_sizes: list[int]):
        super().__init__()
        self.convs = nn.ModuleList()
        prev = num_fields
        for size in layer_sizes:
            self.convs.append(nn.Conv1d(prev * num_fields, size, kernel_size=1))
            prev = size
        self.output_dim = sum(layer_sizes)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x0.shape
        x, pooled = x0, []
        for conv in self.convs:
            z = torch.einsum("bhd,bmd->bhmd", x, x0).reshape(batch, -1, dim)
            x = torch.relu(conv(z))
            pooled.append(x.sum(-1))
        return torch.cat(pooled, dim=1)


class InteractingLayer(nn.Module):
    """AutoInt's multi-head self-attention over fields, with a residual projection:

    ``e'_f = ReLU(concat_h Σ_g softmax_g(<W_Q^h e_f, W_K^h e_g>) W_V^h e_g + W_R e_f)``.
    (B, F, d_in) -> (B, F, attention_dim)
    """

    def __init__(self, in_dim: int, attention_dim: int, num_heads: int, residual: bool = True):
        super().__init__()
        if attention_dim % num_heads:
            raise ValueError("attention_dim must be divisible by attention_heads")
        self.num_heads = num_heads
        self.query = nn.Linear(in_dim, attention_dim, bias=False)
        self.key = nn.Linear(in_dim, attention_dim, bias=False)
        self.value = nn.Linear(in_dim, attention_dim, bias=False)
        self.residual = nn.Linear(in_dim, attention_dim, bias=False) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, fields, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, fields, self.num_heads, -1).transpose(1, 2)  # (B, H, F, d_h)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        out = (scores @ v).transpose(1, 2).reshape(batch, fields, -1)
        if self.residual is not None:
            out = out + self.residual(x)
        return torch.relu(out)


class LogarithmicTransformation(nn.Module):
    """AFN's logarithmic neurons: ``y_j = exp(Σ_f w_jf · ln|e_f|)`` per dimension.

    (B, F, D) -> (B, L·D)
    """

    def __init__(self, num_fields: int, num_neurons: int, eps: float = 1e-7):
        super().__init__()
        self.eps = eps
        self.log_neurons = nn.Linear(num_fields, num_neurons)
        self.norm = nn.BatchNorm1d(num_neurons)
        self.output_dim_factor = num_neurons

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        logs = torch.log(emb.abs().clamp_min(self.eps)).transpose(1, 2)  # (B, D, F)
        y = torch.exp(self.log_neurons(logs).clamp(max=30.0)).transpose(1, 2)  # (B, L, D); clamp keeps it finite
        return self.norm(y).flatten(1)
