"""The learning-rate policy of every stage, in one place, and the optimizers that apply it.

- a CTR model trains at ``train.lr`` (None: :func:`default_lr`, 1e-3 for ID-side models, 5e-5
  where the language model is the CTR model), replayed per epoch by the refit (:class:`~.trainer.FitResult`'s
  ``lr_per_epoch``), lowered on a plateau with ``train.reduce_lr_on_plateau``;
- models with a language model inside train with ``text_finetune`` (:func:`text_finetune_settings`);
  their parameter groups keep fixed ratios to that lr (:func:`lr_scales`: FLIP's ID side and α, a
  language model inside MoRec and CTR-BERT), read by :func:`make_optimizer` off
  ``model.lr_groups()``;
- pretraining: AdamW at ``pretrain.lr``, linear warm-up then cosine decay (:class:`CosineSchedule`,
  :func:`pretraining_optimizer`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.optim.adam import adam

from ..config import Config, PretrainConfig, TrainConfig
from ..models import LrScales
from ..models.contract import CTRModule
from ..models.flip import FlipCTRModel
from ..models.language import LanguageModel
from ..models.plm import PLMCTRModel


def text_finetune_settings(cfg: Config) -> tuple[TrainConfig, dict]:
    """The training settings of the models with a language model inside (``text_finetune`` where it
    differs from ``train``) and their row limits (train_run's ``train_rows`` / ``valid_rows``)."""
    train = dataclasses.replace(cfg.train, lr=cfg.text_finetune.lr, batch_size=cfg.text_finetune.batch_size,
                                epochs=cfg.text_finetune.epochs, refit=cfg.text_finetune.refit,
                                max_seconds=cfg.text_finetune.max_seconds,
                                eval_batch_size=cfg.train.eval_batch_size or 256)
    return train, {"train_rows": cfg.text_finetune.train_rows, "valid_rows": cfg.text_finetune.valid_rows}


ID_MODEL_LR = 1e-3
LANGUAGE_MODEL_LR = 5e-5


def default_lr(model: CTRModule) -> float:
    """``train.lr`` when it is not set: a language model's where the CTR model finetunes one as a
    whole (FLIP_PLM, FLIP), an ID model's for the others (MoRec and CTR-BERT included: their
    language model's own ratio is :func:`lr_scales`' ``text``)."""
    return LANGUAGE_MODEL_LR if isinstance(model, (PLMCTRModel, FlipCTRModel)) else ID_MODEL_LR


def lr_scales(cfg: Config) -> LrScales:
    """The run's ratios: the joint FLIP model trains at ``text_finetune.lr`` with its ID side
    at ``text_finetune.id_lr`` and α at ``alpha_lr``; a language model inside an ID-side
    model (MoRec, CTR-BERT) at ``text_finetune.lr``, the rest at ``train.lr`` (default 1e-3,
    these models' own)."""
    tf = cfg.text_finetune
    return LrScales(id=tf.id_lr / tf.lr, alpha=tf.alpha_lr / tf.lr, text=tf.lr / (cfg.train.lr or ID_MODEL_LR))


def resolve_train_config(cfg: TrainConfig, model: CTRModule) -> TrainConfig:
    """Fill the settings left to the model: ``lr`` (:func:`default_lr`) and ``eval_batch_size``
    (the model's own)."""
    return dataclasses.replace(
        cfg,
        lr=cfg.lr if cfg.lr is not None else default_lr(model),
        eval_batch_size=cfg.eval_batch_size or model.default_eval_batch_size)


class Optimizers:
    """Several optimizers stepped as one: lazy (sparse) Adam for embedding tables whose
    gradients are sparse, and Adam/AdamW for everything else."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def lr(self) -> float:
        """The base lr: a group with its own ``lr_scale`` runs at that multiple of it."""
        group = self.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def set_lr(self, lr: float) -> None:
        """Set the base lr; groups with their own ``lr_scale`` keep their ratio to it."""
        for group in self.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)


class RowSparseAdamW(torch.optim.AdamW):
    """AdamW (fused) that also takes row-sparse gradients (``nn.Embedding(sparse=True)``) and
    updates those tables exactly as it updates a dense gradient: every row's moments and weight
    decay, the rows outside the batch with a zero gradient. The dense gradient exists one chunk
    of ``chunk_rows`` rows at a time, not as a second copy of the table: at millions of features
    (GoodReads) the gradients of the ID embedding and the MTM output table are GBs. The update
    runs the same elementwise kernel on row ranges: given the same gradient the weights equal
    plain AdamW's bit for bit (a sparse backward sums a row's repeated gradients in another
    order: the last bits may differ). The state is AdamW's (``step``, ``exp_avg``,
    ``exp_avg_sq``): checkpoints are alike."""

    def __init__(self, params, chunk_rows: int = 1 << 16, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.chunk_rows = chunk_rows

    @torch.no_grad()
    def step(self, closure=None):
        sparse = [p for group in self.param_groups for p in group["params"] if p.grad is not None and p.grad.is_sparse]
        held = {p: p.grad for p in sparse}
        for p in sparse:  # the parent steps the dense ones
            p.grad = None
        try:
            loss = super().step(closure)
        finally:
            for p, grad in held.items():
                p.grad = grad
        for group in self.param_groups:
            for p in group["params"]:
                if p in held:
                    self._sparse_step(p, held[p], group)
        return loss

    def _sparse_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grad = grad.coalesce()  # rows sorted, each once
        rows, values = grad.indices()[0], grad.values()
        starts = list(range(0, len(p), self.chunk_rows))
        cuts = torch.searchsorted(rows, torch.tensor([*starts, len(p)], device=rows.device)).tolist()
        beta1, beta2 = group["betas"]
        for i, start in enumerate(starts):
            stop = min(start + self.chunk_rows, len(p))
            dense = torch.zeros((stop - start, *p.shape[1:]), dtype=p.dtype, device=p.device)
            dense.index_copy_(0, rows[cuts[i]:cuts[i + 1]] - start, values[cuts[i]:cuts[i + 1]])
            # a copy of the step per call: the kernel counts it up before it uses it
            adam([p[start:stop]], [dense], [state["exp_avg"][start:stop]], [state["exp_avg_sq"][start:stop]], [],
                 [state["step"].clone()], fused=True, decoupled_weight_decay=True, amsgrad=False, beta1=beta1,
                 beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        state["step"] += 1


def use_sparse_embeddings(model: nn.Module, mode: str, setting: str = "train.sparse_embeddings") -> list[nn.Parameter]:
    """Switch large ID embedding tables to sparse gradients; returns their weights.

    ``mode``: "on", "off", or "auto" (tables of at least 100,000 rows: a dense gradient and
    Adam update of every row each step would dominate the step time). A language model's own
    embeddings (word, position, type) stay dense: they are finetuned with AdamW like the rest
    of the encoder."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{setting} must be 'auto', 'on' or 'off', not {mode!r}")
    in_text = {id(m) for lm in model.modules() if isinstance(lm, LanguageModel) for m in lm.modules()}
    tables = []
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.requires_grad and id(module) not in in_text:
            module.sparse = mode == "on" or (mode == "auto" and module.num_embeddings >= 100_000)
            if module.sparse:
                tables.append(module.weight)
    return tables


def make_optimizer(model: CTRModule, cfg: TrainConfig) -> Optimizers:
    if cfg.optimizer not in ("adam", "adamw"):
        raise ValueError(f"train.optimizer must be 'adam' or 'adamw', not {cfg.optimizer!r}")
    sparse = {id(p) for p in use_sparse_embeddings(model, cfg.sparse_embeddings)}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in sparse]
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    # models may ask for their own lr ratio on some parameters (the joint FLIP model's ID side)
    scale = {id(p): g["lr_scale"] for g in model.lr_groups() for p in g["params"]}
    tables = [p for p in model.parameters() if id(p) in sparse]

    def grouped(params: list[nn.Parameter]) -> list[dict]:
        by_scale: dict[float, list] = {}
        for p in params:
            by_scale.setdefault(scale.get(id(p), 1.0), []).append(p)
        return [{"params": ps, "lr_scale": s} for s, ps in by_scale.items()]

    # the fused kernel updates every tensor in one pass: ~25 % more rows/s on CPU
    optimizers = [cls(grouped(dense), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)] if dense else []
    if tables:
        optimizers.append(torch.optim.SparseAdam(grouped(tables), lr=cfg.lr))
    result = Optimizers(optimizers)
    result.set_lr(cfg.lr)
    return result


class CosineSchedule:
    """lr multiplier: linear warm-up for ``warmup`` steps, then cosine decay to 0 at ``total``.

    ``total`` may be lowered while training (a time budget sizes it to the steps that fit); a
    callable object's attributes are saved with ``LambdaLR``'s state, so a resume keeps it."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def pretraining_optimizer(model: nn.Module, cfg: PretrainConfig, planned_steps: int, sparse: bool
                          ) -> tuple[RowSparseAdamW, CosineSchedule, torch.optim.lr_scheduler.LambdaLR]:
    """Pretraining's optimizer: AdamW (fused) at ``cfg.lr`` on every trainable parameter, large ID
    tables with row-sparse gradients where ``sparse`` (not under DDP, which reduces dense ones),
    the lr warmed up for ``cfg.warmup_steps`` then decayed to 0 at ``planned_steps``."""
    use_sparse_embeddings(model, cfg.sparse_embeddings if sparse else "off", "pretrain.sparse_embeddings")
    optimizer = RowSparseAdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                               weight_decay=cfg.weight_decay)
    schedule = CosineSchedule(cfg.warmup_steps, planned_steps)
    return optimizer, schedule, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
