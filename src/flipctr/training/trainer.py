"""The training loop: one place for optimisation, early stopping, evaluation and checkpoints.

The trainer sees tensors of ids and labels, never a dataset name or a file.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..data.batching import DeviceRows
from ..models.backbones import CTRModel
from ..models.contract import CTRModule
from ..runtime.device import Runtime
from ..runtime.distributed import gather_rows, rank_rows, rank_world
from .budget import Budget, agree_any
from .engine import Engine, Stage, shard_size
from .metrics import ctr_metrics
from .optim import make_optimizer, resolve_train_config
from .tracking import Tracker

log = logging.getLogger("flipctr")


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    train_loss: float
    seconds: float  # training steps only, evaluation excluded
    samples_per_second: float
    samples: int = 0  # rows trained on in this epoch (fewer in a fractional last epoch)
    evals: list[dict[str, float]] = field(default_factory=list)  # {"epoch": 2.5, "auc", "logloss"}


@dataclass
class FitResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: float = 0.0  # epochs of training at the best evaluation (2.5 = mid-epoch 3); 0 without eval
    best_eval: dict[str, float] | None = None
    stopped: str | None = None  # "patience" (early stopping), "budget" (train.max_seconds), None: ran all epochs
    seconds: float = 0.0  # the fit's wall-clock time (evaluations included; what a time budget counts)

    @property
    def samples_per_second(self) -> float:
        rates = [r.samples_per_second for r in self.history]
        return float(np.mean(rates)) if rates else float("nan")

    @property
    def lr_per_epoch(self) -> list[float]:
        return [r.lr for r in self.history]


@torch.no_grad()
def predict(model: CTRModule, split: DeviceRows, batch_size: int = 8192, runtime: Runtime | None = None) -> np.ndarray:
    """Probabilities for every row of ``split``, in ``runtime``'s precision (default fp32 on the
    split's device). Under DDP each rank scores every world-th row (the last ones wrapping round
    to equal counts) and the scores are gathered: every rank returns all of them, so all ranks
    agree on metrics and early stopping. Rows with text are scored in order of prompt length,
    each batch padded to its longest row (in time order a batch of thousands pads nearly every
    row to the longest prompt), and put back in order."""
    model.eval()
    runtime = runtime or Runtime(split.labels.device)
    names, device, out = model.input_names, split.labels.device, []
    share = rank_rows(len(split))
    lengths = split.host("lengths")
    by_length = None if lengths is None else torch.argsort(lengths[share], stable=True)
    order = share if by_length is None else share[by_length]
    widths = split.batch_widths(order, batch_size)
    for k, i in enumerate(range(0, len(order), batch_size)):
        batch = split.batch(order[i:i + batch_size].to(device), names, widths[k] if widths else None)
        with runtime.autocast():
            out.append(torch.sigmoid(model(**batch).logits.float()))
    scores = torch.cat(out)
    if by_length is not None:  # back to the share's order, which the gather expects
        scores = torch.empty_like(scores).index_copy_(0, by_length.to(scores.device), scores)
    return gather_rows(scores, len(split)).cpu().numpy()


def evaluate(model: CTRModule, split: DeviceRows, batch_size: int = 8192, runtime: Runtime | None = None
             ) -> dict[str, float]:
    return ctr_metrics(split.labels.cpu().numpy(), predict(model, split, batch_size, runtime))


class Trainer:
    """Mini-batch BCE training of a CTR model with optional early stopping on an eval split."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime):
        """``runtime``: where and in which precision to compute (:meth:`Runtime.of` ``cfg``)."""
        self.cfg, self.runtime = cfg, runtime
        self.device = self.runtime.device

    def evaluate(self, model: CTRModule, split: DeviceRows) -> dict[str, float]:
        cfg = resolve_train_config(self.cfg, model)
        return evaluate(model, split, cfg.eval_batch_size, self.runtime)

    def fit(
        self,
        model: CTRModule,
        train: DeviceRows,
        eval_split: DeviceRows | None = None,
        epochs: float | None = None,
        lr_schedule: list[float] | None = None,
        on_epoch_end: Callable[[EpochRecord], None] | None = None,
        tracker: Tracker | None = None,
        stage: str = "train",
        checkpoint: Path | None = None,
        resume: bool = False,
    ) -> FitResult:
        """Train for ``epochs`` (default ``cfg.epochs``; a fraction trains part of the last epoch).

        With ``eval_split``: evaluate ``cfg.evals_per_epoch`` times per epoch, keep the weights
        of the best AUC, stop after ``cfg.patience`` evaluations without gain, and restore the
        best weights before returning. ``lr_schedule`` replays per-epoch learning rates (the
        refit repeats the selection run's). ``tracker``: TensorBoard scalars under ``stage``
        (``<stage>/loss``, ``<stage>/lr``, ``valid/auc``, ``valid/logloss``, the model's summary).
        ``checkpoint``: the :class:`~.engine.Engine`'s file after every epoch (with the
        early-stopping state and best weights); with ``resume`` a fit continues after its last
        epoch and ends as an uninterrupted one would.
        """
        run = Finetuning(self, model, train, eval_split, epochs, lr_schedule, on_epoch_end, tracker, stage)
        Engine(self.runtime).fit(run, train, checkpoint, resume)
        return run.finish()


class Finetuning(Stage):
    """Finetuning as an engine :class:`~.engine.Stage`: BCE on the logits (+ each auxiliary head,
    FLIP Eq. 15), evaluations inside epochs, early stopping on validation AUC, a time budget
    checked at each evaluation, the lr replayed per epoch or lowered on a plateau."""

    def __init__(self, trainer: Trainer, model: CTRModule, train: DeviceRows, eval_split: DeviceRows | None,
                 epochs: float | None, lr_schedule: list[float] | None,
                 on_epoch_end: Callable[[EpochRecord], None] | None, tracker: Tracker | None, stage: str):
        cfg = resolve_train_config(trainer.cfg, model)
        epochs = cfg.epochs if epochs is None else epochs
        if rank_world()[1] > 1 and cfg.sparse_embeddings != "off":
            log.info("data-parallel: embedding tables get dense gradients (train.sparse_embeddings=off)")
            cfg = dataclasses.replace(cfg, sparse_embeddings="off")
        self.trainer, self.cfg, self.runtime = trainer, cfg, trainer.runtime
        self.train, self.eval_split, self.lr_schedule = train, eval_split, lr_schedule
        self.on_epoch_end, self.tracker, self.name = on_epoch_end, tracker, stage
        self.model = model.to(self.runtime.device)
        self.optimizer = make_optimizer(model, cfg)
        self.wrapped = self.runtime.wrap(model)
        self.generators = {"shuffle": torch.Generator(device="cpu").manual_seed(cfg.seed)}
        self.names, self.batch_size, self.length_buckets = model.input_names, cfg.batch_size, cfg.length_buckets
        self.max_seconds, self.desc, self.progress = cfg.max_seconds, "epoch", cfg.progress
        self.reduce_lr = cfg.reduce_lr_on_plateau and eval_split is not None and lr_schedule is None
        self.last_epoch_auc = -math.inf
        self.result, self.best_state, self.bad_evals, self.stop = FitResult(), None, 0, False
        self.steps_per_epoch = math.ceil(shard_size(len(train)) / cfg.batch_size)
        self.total_steps = round(epochs * self.steps_per_epoch)
        evals = max(1, cfg.evals_per_epoch)
        self.eval_steps = {round(self.steps_per_epoch * k / evals) for k in range(1, evals + 1)}
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.embedding_l2 = cfg.embedding_l2 if isinstance(model, CTRModel) else 0.0
        if cfg.embedding_l2 > 0 and not self.embedding_l2:
            log.info("train.embedding_l2 ignored: %s has no ID embeddings", type(model).__name__)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.step_loss = self._step_loss
        if cfg.compile:  # fuses the many small ops of an ID model's step; compiling costs ~15-40 s
            self.step_loss = torch.compile(self._step_loss)

    def _step_loss(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Forward and loss of one batch: BCE on the logits (+ each auxiliary head, FLIP Eq. 15)."""
        with self.runtime.autocast():
            out = self.wrapped(**batch)
        loss = self.loss_fn(out.logits.float(), labels)
        for aux in out.aux_logits:
            loss = loss + self.loss_fn(aux.float(), labels)
        if self.embedding_l2 > 0:
            loss = loss + self.embedding_l2 * self.model.embed(batch["ids"]).pow(2).sum() / len(labels)
        return loss

    def state(self) -> dict:
        r = self.result
        return {"best_state": self.best_state, "bad_evals": self.bad_evals, "last_epoch_auc": self.last_epoch_auc,
                "history": [vars(h) for h in r.history], "best_epoch": r.best_epoch, "best_eval": r.best_eval,
                "stopped": r.stopped}

    def load_state(self, state: dict) -> None:
        self.best_state, self.bad_evals, self.last_epoch_auc = (state["best_state"], state["bad_evals"],
                                                                state["last_epoch_auc"])
        self.result = FitResult([EpochRecord(**r) for r in state["history"]], state["best_epoch"],
                                state["best_eval"], state["stopped"])

    def begin(self, budget: Budget) -> None:
        self.budget, self.checked = budget, budget.elapsed()  # checked: when the budget was last checked

    def out_of_time(self) -> bool:
        """Checked at each evaluation (each epoch's end without one): stop when the next
        interval, as long as the last one, would end past the budget."""
        if not self.budget.limited:
            return False
        now = self.budget.elapsed()
        late, self.checked = now + (now - self.checked) > self.budget.seconds, now
        return agree_any(late, self.runtime.device)

    def begin_epoch(self, epoch: int, order: torch.Tensor) -> int:
        if self.lr_schedule is not None:
            self.optimizer.set_lr(self.lr_schedule[min(epoch, len(self.lr_schedule)) - 1])
        self.total, self.seen = torch.zeros((), device=self.runtime.device), 0
        self.record = EpochRecord(epoch, self.optimizer.lr, 0.0, 0.0, 0.0)  # the base lr (refit replays it)
        self.eval_seconds = 0.0
        return min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch)

    def loss(self, step: int, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        labels = self.train.labels[rows]
        loss = self.step_loss(batch, labels)
        self.total += loss.detach() * len(labels)
        self.seen += len(labels)
        return loss

    def after_step(self, step: int, loss: torch.Tensor) -> bool:
        """At each evaluation point: evaluate, keep the best weights, stop on patience or time."""
        if self.eval_split is None or step + 1 not in self.eval_steps:
            return False
        tick, result, epoch = time.perf_counter(), self.result, self.record.epoch
        at = round(epoch - 1 + (step + 1) / self.steps_per_epoch, 4)
        metrics = self.trainer.evaluate(self.model, self.eval_split)
        self.record.evals.append({"epoch": at, **metrics})
        log.info("  epoch %.2f  eval auc %.5f  logloss %.5f", at, metrics["auc"], metrics["logloss"])
        if self.tracker is not None:
            self.tracker.scalars((epoch - 1) * self.steps_per_epoch + step + 1,
                                 {"valid/auc": metrics["auc"], "valid/logloss": metrics["logloss"],
                                  **{f"model/{k}": v for k, v in self.model.summary().items()}})
        if result.best_eval is None or metrics["auc"] > result.best_eval["auc"]:
            result.best_epoch, result.best_eval, self.bad_evals = at, metrics, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad_evals += 1
        self.wrapped.train()
        self.eval_seconds += time.perf_counter() - tick
        if self.bad_evals >= self.cfg.patience:
            self.stop, result.stopped = True, "patience"
        elif self.out_of_time():
            self.stop, result.stopped = True, "budget"
        return self.stop

    def end_epoch(self, epoch: int, steps: int, seconds: float) -> bool:
        record, result, cfg = self.record, self.result, self.cfg
        seconds -= self.eval_seconds  # training time only
        record.train_loss, record.seconds = float(self.total) / max(self.seen, 1), seconds
        record.samples, record.samples_per_second = self.seen, self.seen / max(seconds, 1e-9)
        if self.reduce_lr and record.evals:  # end-of-epoch AUC did not improve: lower the lr
            if record.evals[-1]["auc"] <= self.last_epoch_auc:
                self.optimizer.set_lr(record.lr * cfg.reduce_lr_factor)
            self.last_epoch_auc = max(self.last_epoch_auc, record.evals[-1]["auc"])
        if self.eval_split is None and not self.stop and epoch < self.epochs and self.out_of_time():
            self.stop, result.stopped = True, "budget"
        result.history.append(record)
        log.info("epoch %d  lr %.2e  train loss %.5f  %.0f samples/s", epoch, record.lr, record.train_loss,
                 record.samples_per_second)
        if self.tracker is not None:
            self.tracker.scalars((epoch - 1) * self.steps_per_epoch + steps,
                                 {f"{self.name}/loss": record.train_loss, f"{self.name}/lr": record.lr,
                                  f"{self.name}/samples_per_second": record.samples_per_second})
        if self.on_epoch_end is not None:
            self.on_epoch_end(record)
        if self.stop:
            if result.stopped == "budget":
                log.info("stopped by the %.0f s time budget after %.0f s; best at epoch %g", self.budget.seconds,
                         self.budget.elapsed(), result.best_epoch)
            else:
                log.info("early stop: no eval AUC gain in %d evaluations; best at epoch %g", self.bad_evals,
                         result.best_epoch)
        return self.stop

    def finish(self) -> FitResult:
        """The best weights restored; the fit's result."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.result.seconds = self.budget.elapsed()
        return self.result
