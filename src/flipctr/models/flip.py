"""FLIP: fine-grained alignment of an ID-based model and a language model.

Pretraining (paper 3.3): masked language modeling with the tabular representation (MLM,
Eq. 5-6), masked tabular modeling with cross-attention to the text and NCE (MTM, Eq. 7-10),
and instance-level contrastive learning (ICL, Eq. 11); total loss Eq. 12.
Finetuning (3.4): ``σ(α ℓ_ID + (1 − α) ℓ_PLM)`` with three BCE losses (Eq. 13-15).

Shapes: B batch, F fields, L tokens, Dt text hidden size, Dv ID representation size,
V text vocabulary, M feature space (global ids), K noise features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FlipSettings
from ..data.masking import FieldMasker, MaskedBatch
from ..runtime.distributed import rank_world
from .backbones import CTRModel
from .contract import CTRModule, CTROutput, LMOutput, PretrainOutput
from .language import LanguageModel
from .plm import TEXT_INPUTS, TEXT_VECTOR_INPUTS, text_vector


def nce_loss(target_scores: torch.Tensor, noise_scores: torch.Tensor, target_logq: torch.Tensor,
             noise_logq: torch.Tensor, k: int) -> torch.Tensor:
    """Noise-contrastive estimation (Eq. 10) with the ``log(K q)`` correction.

    The classifier's logit for feature j is ``s_j − log(K q_j)``: targets (N,) are pushed to 1,
    noise (N, K) to 0. Returns the per-target loss (N,).
    """
    pos = target_scores - (math.log(k) + target_logq)
    neg = noise_scores - (math.log(k) + noise_logq)
    return F.softplus(-pos) + F.softplus(neg).sum(-1)


def info_nce(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, rows: slice = slice(None)) -> torch.Tensor:
    """Symmetric InfoNCE with dot-product similarity (Eq. 11): z_a, z_b (N, d) -> scalar.

    Row i of ``z_a`` and of ``z_b`` is a pair; ``rows`` are the queries (under DDP this rank's
    rows of the gathered batch), each scored against all N rows of the other modality. The
    loss is the mean over the queries, both directions averaged.
    """
    target = torch.arange(len(z_a), device=z_a.device)[rows]
    a_to_b = z_a[rows] @ z_b.t() / temperature
    b_to_a = z_b[rows] @ z_a.t() / temperature
    return 0.5 * (F.cross_entropy(a_to_b, target) + F.cross_entropy(b_to_a, target))


def take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for an index with repeats, with a backward that sums the repeats in a
    fixed order: advanced indexing's backward accumulates in parallel on CPUs, so two runs
    with the same seed would differ in the last bits (and Adam makes those bits lr-sized)."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


class _GatherRows(torch.autograd.Function):
    """All-gather with a gradient: forward, every rank's ``(n, ...)`` rows concatenated in rank
    order, ``(world * n, ...)``; backward, each rank's slice of every rank's gradient, summed
    in rank order (an all-to-all, as gloo has no reduce-scatter), the same sum on every run.
    Written here because ``torch.distributed.nn.functional.all_gather`` is deprecated and its
    replacement lives in a private module (``_functional_collectives``)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        world = torch.distributed.get_world_size()
        parts = [torch.empty_like(z) for _ in range(world)]
        torch.distributed.all_gather(parts, z)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        world = torch.distributed.get_world_size()
        sent = [g.contiguous() for g in grad.chunk(world, dim=0)]
        received = [torch.empty_like(g) for g in sent]
        torch.distributed.all_to_all(received, sent)
        return torch.stack(received).sum(dim=0)


def gather_with_grad(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows under DDP, in rank order, the gradient flowing back to their owners
    (:class:`_GatherRows`), and the offset of this rank's rows; ``(z, 0)`` outside DDP.
    Each rank must hold the same number of rows (the pretraining shards are padded to it)."""
    rank, world = rank_world()
    if world == 1:
        return z, 0
    return _GatherRows.apply(z.contiguous()), rank * len(z)


class MLMHead(nn.Module):
    """g_PLM (Eq. 5): ``Linear(Dt + Dv → Dt) → tanh → dropout → Linear(Dt → V)``."""

    def __init__(self, text_dim: int, tab_dim: int, vocab_size: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(text_dim + tab_dim, text_dim), nn.Tanh(), nn.Dropout(dropout),
                                 nn.Linear(text_dim, vocab_size))

    def forward(self, tokens: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """tokens (N, Dt) masked positions only, reference (N, Dv) or None -> (N, V) logits."""
        return self.net(torch.cat([tokens, reference], -1))


class MTMHead(nn.Module):
    """Cross-attention (Eq. 7) and per-field NCE scoring of the masked features (Eq. 8-10).

    ``u = softmax(v̂ Q wᵀ / √Dt) w`` over the clean text states, padding masked. A masked
    field f is scored as ``s_j = P_f [v̂ ⊕ u] · E_j + b_j`` for feature j, where ``E`` is an
    output table over all M features and ``b_j`` starts at ``log q_j`` (the training
    frequency), so the NCE classifier starts at 1/(K+1) for every feature.
    """

    def __init__(self, tab_dim: int, text_dim: int, num_fields: int, counts: torch.Tensor, dim: int,
                 joint: bool = True):
        super().__init__()
        self.query = nn.Linear(tab_dim, text_dim, bias=False) if joint else None  # Q
        self.field_proj = nn.Parameter(torch.empty(num_fields, tab_dim + (text_dim if joint else 0), dim))
        self.output = nn.Embedding(len(counts), dim)
        q = counts.double().clamp_min(1) / counts.double().clamp_min(1).sum()  # smoothed frequencies
        self.register_buffer("log_q", q.log().float(), persistent=True)
        self.register_buffer("noise_probs", counts.double().clamp_min(0).float(), persistent=False)
        self.bias = nn.Parameter(self.log_q.clone())
        nn.init.xavier_normal_(self.field_proj)
        nn.init.normal_(self.output.weight, std=dim ** -0.5)
        self.text_dim = text_dim

    def attend(self, v_hat: torch.Tensor, w: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """v_hat (B, Dv), w (B, L, Dt), attention_mask (B, L) -> u (B, Dt)."""
        scores = torch.einsum("bd,bld->bl", self.query(v_hat), w) / math.sqrt(self.text_dim)
        scores = scores.masked_fill(attention_mask == 0, torch.finfo(scores.dtype).min)
        return torch.einsum("bl,bld->bd", torch.softmax(scores, -1), w)

    def sample_noise(self, n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, k) feature ids drawn by training frequency."""
        return torch.multinomial(self.noise_probs, n * k, replacement=True, generator=generator).view(n, k)

    def forward(self, v_hat: torch.Tensor, u: torch.Tensor | None, fields: torch.Tensor, targets: torch.Tensor,
                k: int, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample MTM loss (B,): mean NCE loss over the sample's masked fields (Eq. 9-10).

        fields (B, m) the masked fields, targets (B, F) the original ids; fixed shapes, so no
        step waits on the host. ``u`` None: no text reference (ablation "w/o joint reconstruction").
        ``noise``: the global batch's noise drawn ahead, :meth:`sample_noise` ``(B·world·m, k)``
        (a step that draws nothing traces whole); None: drawn here from ``generator``.
        """
        ctx = v_hat if u is None else torch.cat([v_hat, u], -1)
        h = torch.einsum("bd,bmde->bme", ctx, take(self.field_proj, fields))  # (B, m, dim)
        target = targets.gather(1, fields).long()  # (B, m)
        # under DDP every rank draws the global batch's noise (rank r holds its rows r, r + world, ...)
        # and keeps its own rows: a row's noise does not depend on the rank that holds it
        rank, world = rank_world()
        if noise is None:
            noise = self.sample_noise(target.numel() * world, k, generator)
        noise = noise.to(target.device).view(len(target) * world, target.shape[1], k)[rank::world]
        target_scores = (h * self.output(target)).sum(-1) + take(self.bias, target)
        noise_scores = torch.einsum("bme,bmke->bmk", h, self.output(noise)) + take(self.bias, noise)
        return nce_loss(target_scores, noise_scores, self.log_q[target], self.log_q[noise], k).mean(1)


class ICLHead(nn.Module):
    """Projections of ``[CLS]`` and ``v`` to d dims; symmetric InfoNCE, τ (Eq. 11)."""

    def __init__(self, text_dim: int, tab_dim: int, dim: int, temperature: float):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, dim)
        self.tab_proj = nn.Linear(tab_dim, dim)
        self.temperature = temperature

    def forward(self, cls: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Under DDP this rank's pairs are scored against the negatives of every rank; with the
        gradient gathered too and DDP's averaging, loss and gradients equal one process on
        the global batch."""
        z_text, offset = gather_with_grad(self.text_proj(cls))
        z_tab, _ = gather_with_grad(self.tab_proj(v))
        return info_nce(z_text, z_tab, self.temperature, slice(offset, offset + len(cls)))


class FlipPretrainModel(nn.Module):
    """The ID backbone and the language model with the three alignment heads."""

    input_names = ("ids", "input_ids", "attention_mask", "value_spans")

    def __init__(self, backbone: CTRModel, language_model: LanguageModel, counts: torch.Tensor,
                 config: FlipSettings, tab_mask_id: int, text_mask_id: int, vocab_size: int,
                 cls_id: int | None = None, sep_id: int | None = None):
        super().__init__()
        if not (config.mlm or config.mtm or config.icl):
            raise ValueError("pretraining needs at least one of MLM, MTM, ICL")
        self.config, self.backbone, self.language_model = config, backbone, language_model
        dt, dv = language_model.hidden_size, backbone.output_dim
        self.masker = FieldMasker(backbone.num_fields, tab_mask_id, text_mask_id, config.text_mask_ratio,
                                  config.tab_mask_ratio, config.token_level_masking, cls_id, sep_id)
        self.mlm_head = MLMHead(dt, dv if config.joint_reconstruction else 0, vocab_size,
                                config.mlm_dropout) if config.mlm else None
        self.mtm_head = (MTMHead(dv, dt, backbone.num_fields, counts, config.mtm_dim, config.joint_reconstruction)
                         if config.mtm else None)
        self.icl_head = ICLHead(dt, dv, config.icl_dim, config.temperature) if config.icl else None

    def forward(self, ids: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                value_spans: torch.Tensor, generator: torch.Generator | None = None,
                text_targets: int | None = None, tab_fields: torch.Tensor | None = None,
                text_fields: torch.Tensor | None = None, nce_noise: torch.Tensor | None = None) -> PretrainOutput:
        """``text_targets``: the batch's masked tokens, or an upper bound, known on the host (with
        the fields chosen ahead, ``tab_fields``/``text_fields``, the exact count; else the sum of
        ``FieldMasker.max_text_targets``); the MLM head then runs on that many positions, padding
        weighted 0, and nothing waits on the device. None: the count is read from the device.
        ``nce_noise``: MTM's noise drawn ahead (:meth:`MTMHead.forward`)."""
        cfg = self.config
        masked: MaskedBatch = self.masker(ids, input_ids, attention_mask, value_spans, generator, tab_fields,
                                          text_fields)
        need_clean_text = cfg.icl or (cfg.mtm and cfg.joint_reconstruction)
        need_clean_tab = cfg.icl or (cfg.mlm and cfg.joint_reconstruction)
        w = w_hat = None
        if need_clean_text and cfg.mlm:  # clean and masked text as one batch of 2B: one encoder pass
            both = self.language_model(torch.cat([input_ids, masked.masked_input_ids]),
                                       torch.cat([attention_mask, attention_mask]))
            w = LMOutput(both.hidden_states[:len(ids)], both.cls[:len(ids)])
            w_hat = both.hidden_states[len(ids):]
        elif need_clean_text:
            w = self.language_model(input_ids, attention_mask)
        elif cfg.mlm:
            w_hat = self.language_model(masked.masked_input_ids, attention_mask).hidden_states
        v = self.backbone.encode(ids) if need_clean_tab else None
        losses: dict[str, torch.Tensor] = {}
        if cfg.mlm:
            losses["mlm"] = self._mlm_loss(w_hat, v, input_ids, masked.text_positions, text_targets)
        if cfg.mtm:
            v_hat = self.backbone.encode(masked.masked_ids)
            u = self.mtm_head.attend(v_hat, w.hidden_states, attention_mask) if cfg.joint_reconstruction else None
            losses["mtm"] = self.mtm_head(v_hat, u, masked.tab_fields, ids, cfg.nce_noise, generator,
                                     nce_noise).float().mean()
        if cfg.icl:
            losses["icl"] = self.icl_head(w.cls, v)
        return PretrainOutput(sum(losses.values()), losses.get("mlm"), losses.get("mtm"), losses.get("icl"),
                              masked.text_fields_lost)

    def _mlm_loss(self, w_hat: torch.Tensor, v: torch.Tensor | None, input_ids: torch.Tensor,
                  positions: torch.Tensor, budget: int | None) -> torch.Tensor:
        """Eq. 6: per sample, the mean cross-entropy over its masked tokens; summed over the
        samples and divided by B (Eq. 12's mean). ``positions`` (B, L) bool."""
        if budget is None:
            where = positions.nonzero()
        else:  # a fixed number of rows (the bound), the rest filled with -1
            where = torch.nonzero_static(positions, size=max(1, budget), fill_value=-1)
        valid = where[:, 0] >= 0
        rows, cols = where.clamp_min(0).unbind(1)
        ref = take(v, rows) if self.config.joint_reconstruction else w_hat.new_zeros(len(rows), 0)
        logits = self.mlm_head(w_hat[rows, cols], ref)
        per_token = F.cross_entropy(logits.float(), input_ids[rows, cols].long(), reduction="none")
        per_sample = torch.zeros(len(input_ids), device=input_ids.device).index_add_(
            0, rows, per_token * valid)
        return (per_sample / positions.sum(1).clamp_min(1)).sum() / len(input_ids)


class FlipCTRModel(CTRModule):
    """Adaptive finetuning (Eq. 13-15): ``logit = α ℓ_ID + (1 − α) ℓ_PLM`` with α learnable;
    the ID and PLM logits are returned too, for their own BCE terms. ``language_model=None``:
    the text side reads precomputed ``text_cls`` vectors (size ``hidden_size``) of a frozen encoder.

    ``α = sigmoid(a)`` stays in [0, 1]; ``a`` trains at its own learning rate
    (``alpha_lr_scale`` times the base lr): at a language model's lr (5e-5) it would barely move.
    """

    default_eval_batch_size = 256

    def __init__(self, backbone: CTRModel, language_model: LanguageModel | None, alpha: float = 0.5,
                 id_lr_scale: float = 1.0, hidden_size: int | None = None, alpha_lr_scale: float = 1.0):
        super().__init__()
        if not 0 < alpha < 1:
            raise ValueError(f"the joint model's initial alpha must lie in (0, 1), not {alpha}")
        self.backbone, self.language_model = backbone, language_model
        self.input_names = ("ids", *(TEXT_INPUTS if language_model is not None else TEXT_VECTOR_INPUTS))
        self.id_lr_scale, self.alpha_lr_scale = id_lr_scale, alpha_lr_scale
        self.plm_head = nn.Linear(language_model.hidden_size if language_model is not None else hidden_size, 1)
        nn.init.xavier_normal_(self.plm_head.weight)
        nn.init.zeros_(self.plm_head.bias)
        self.alpha_logit = nn.Parameter(torch.logit(torch.tensor(float(alpha))))

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The ID side's field embeddings (B, F, D) (``train.embedding_l2``)."""
        return self.backbone.embed(ids)

    def lr_groups(self) -> list[dict]:
        """The ID backbone trains at ``id_lr_scale`` times the base lr (an ID model wants ~1e-3,
        a language model ~5e-5), α at ``alpha_lr_scale`` times."""
        return [{"params": list(self.backbone.parameters()), "lr_scale": self.id_lr_scale},
                {"params": [self.alpha_logit], "lr_scale": self.alpha_lr_scale}]

    def summary(self) -> dict[str, float]:
        """What a run reports about the trained model (metrics.json)."""
        return {"alpha": float(self.alpha.detach())}

    def forward(self, ids: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, text_cls: torch.Tensor | None = None) -> CTROutput:
        v = self.backbone.encode(ids)
        id_logit = self.backbone.logit(v)
        plm_logit = self.plm_head(text_vector(self.language_model, input_ids, attention_mask, text_cls)).squeeze(-1)
        alpha = self.alpha
        logits = alpha * id_logit + (1 - alpha) * plm_logit
        return CTROutput(logits, v, aux_logits=(id_logit, plm_logit))
