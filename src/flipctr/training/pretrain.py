"""Modality-alignment pretraining loop (FLIP 3.3): AdamW, warm-up then cosine decay, a
checkpoint every epoch (weights as safetensors, optimizer/scheduler/RNG state beside them) so a
killed run resumes where it stopped, and per-objective loss curves (log, JSON, PNG)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch

from ..config import PretrainConfig
from ..data.batching import DeviceRows
from ..models.flip import FlipPretrainModel
from ..runtime.checkpoints import save_weights
from ..runtime.device import Runtime
from ..runtime.distributed import rank_world
from ..runtime.folder import RunFolder
from ..utils import atomic_path, write_json
from .budget import Budget, agree_any, agree_min
from .engine import Engine, Stage, shard_size
from .optim import CosineSchedule, pretraining_optimizer
from .tracking import Tracker

log = logging.getLogger("flipctr")
OBJECTIVES = ("mlm", "mtm", "icl")


class ScheduleSizer:
    """Sizes a :class:`CosineSchedule` to a time budget: steps per second are measured from the
    ``skip``-th step of this call on (the first steps choose kernels, compile), after ``first``
    measured steps the schedule's total is lowered to the steps that fit in what is left of the
    budget, and the measure is checked again every ``every`` steps (checkpoints included). Until
    the first measure, a budget already spent stops at that step. The total only ever shrinks;
    every rank agrees on it. ``margin``: the share of the remaining time kept for the last
    checkpoint and the measurement's error."""

    def __init__(self, budget: Budget, schedule: CosineSchedule, runtime: Runtime,
                 skip: int = 3, first: int = 10, every: int = 50, margin: float = 0.03):
        self.budget, self.schedule, self.runtime = budget, schedule, runtime
        self.skip, self.first, self.every, self.margin = skip, first, every, margin
        self.start: int | None = None  # the step count this call started from
        self.mark: tuple[int, float] | None = None  # (step count, budget seconds) the measure starts at
        self.rate: float | None = None  # steps per second
        self.planned = schedule.total

    def after_step(self, step_count: int) -> None:
        if self.start is None:
            self.start = step_count - 1
        measured = 0 if self.mark is None else step_count - self.mark[0]
        if measured < self.first:  # no measure yet: stop where the budget runs out (host clock, ranks agree)
            if agree_any(self.budget.remaining() <= 0, self.runtime.device):
                self.schedule.total = min(self.schedule.total, step_count)
                return
        if self.mark is None:
            if step_count - self.start == self.skip:
                self.runtime.synchronize()
                self.mark = (step_count, self.budget.elapsed())
            return
        if measured >= self.first and (measured - self.first) % self.every == 0:
            self.plan(step_count)

    def plan(self, step_count: int) -> None:
        self.runtime.synchronize()
        seconds = self.budget.elapsed() - self.mark[1]
        self.rate = (step_count - self.mark[0]) / max(seconds, 1e-9)
        fits = step_count + int(max(self.budget.remaining(), 0.0) * (1 - self.margin) * self.rate)
        fits = agree_min(fits, self.runtime.device)
        if fits < self.schedule.total:
            if self.schedule.total == self.planned:
                log.info("pretraining budget %.0f s: %.2f steps/s measured, schedule sized to %d of %d steps",
                         self.budget.seconds, self.rate, fits, self.schedule.total)
            self.schedule.total = fits


class Pretrainer:
    """Runs :class:`~flipctr.models.flip.FlipPretrainModel` over a split of paired inputs."""

    def __init__(self, cfg: PretrainConfig, runtime: Runtime, folder: Path):
        """``runtime``: where and in which precision to compute (:meth:`Runtime.of` ``cfg``);
        ``folder``: where the pretraining's files go (:class:`~flipctr.runtime.folder.RunFolder`)."""
        self.cfg, self.folder, self.runtime = cfg, RunFolder(folder), runtime
        self.device = self.runtime.device

    def fit(self, model: FlipPretrainModel, data: DeviceRows, resume: bool = False,
            on_step: Callable[[int, int, float], None] | None = None) -> list[dict]:
        """Pretrain for ``cfg.epochs``; with ``resume`` continue from the last saved epoch. After
        each epoch (rank 0): the engine's checkpoint, the weights as ``pretrained.safetensors``
        and the history as ``pretrain_history.json``."""
        self.folder.create()
        stage = Pretraining(self, model, data, on_step)
        Engine(self.runtime).fit(stage, data, self.folder.pretrain_state, resume)
        stage.tracker.close()
        if rank_world()[0] == 0:
            self._plot(stage.history)
        return stage.history

    def _plot(self, history: list[dict]) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # plotting is optional
            log.info("matplotlib not installed: no loss plot")
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = [r["epoch"] for r in history]
        for name in (*OBJECTIVES, "loss"):
            if name in history[0]:
                ax.plot(epochs, [r[name] for r in history], marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean loss")
        ax.set_title("FLIP pretraining")
        ax.legend()
        fig.tight_layout()
        with atomic_path(self.folder.pretrain_plot) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


class Pretraining(Stage):
    """Pretraining as an engine :class:`~.engine.Stage`: the FLIP objectives' summed loss, AdamW
    with warm-up and cosine decay stepped per step, the masked fields drawn per batch on the
    global batch, and a time budget that sizes the schedule (:class:`ScheduleSizer`)."""

    names = ("ids", "input_ids", "attention_mask", "value_spans")
    name, desc = "pretraining", "pretrain"

    def __init__(self, owner: Pretrainer, model: FlipPretrainModel, data: DeviceRows,
                 on_step: Callable[[int, int, float], None] | None):
        cfg, rank = owner.cfg, rank_world()[0]
        self.owner, self.cfg, self.runtime, self.data, self.on_step = owner, cfg, owner.runtime, data, on_step
        self.model = model.to(self.runtime.device)
        # under DDP the backbone's logit layer (and heads switched off) get no gradient in pretraining
        self.wrapped = self.runtime.wrap(model, find_unused=True)
        self.steps_per_epoch = math.ceil(shard_size(len(data)) / cfg.batch_size)
        self.planned = self.steps_per_epoch * cfg.epochs
        self.optimizer, self.schedule, self.scheduler = pretraining_optimizer(model, cfg, self.planned,
                                                                              sparse=rank_world()[1] == 1)
        # masks and NCE noise are drawn alike on every rank for every rank's rows, each rank keeping
        # its own: a row's draws do not depend on the rank that holds it (DDP equals one process)
        self.generators = {"shuffle": torch.Generator().manual_seed(cfg.seed),
                           "masking": torch.Generator(device=self.runtime.device).manual_seed(cfg.seed + 1),
                           "choice": torch.Generator().manual_seed(cfg.seed + 3)}  # masked fields
        torch.manual_seed(cfg.seed + 2 + rank)  # dropout: per rank
        self.batch_size, self.length_buckets, self.epochs = cfg.batch_size, cfg.length_buckets, cfg.epochs
        self.max_seconds, self.progress = cfg.max_seconds, cfg.progress
        self.history: list[dict] = []
        self.tracker = Tracker(owner.folder.tensorboard)
        self.host_rows = data.host_rows if "value_spans" in data.inputs else None
        self.cuda = self.runtime.device.type == "cuda"

    def state(self) -> dict:
        return {"history": self.history}

    def load_state(self, state: dict) -> None:
        self.history = state["history"]

    def begin(self, budget: Budget) -> None:
        self.budget = budget
        self.sizer = ScheduleSizer(budget, self.schedule, self.runtime) if budget.limited else None
        self.step_count = self.scheduler.last_epoch  # optimizer steps taken, an earlier call's included
        if self.cfg.compile:  # the encoder's shapes: a few bucket widths (multiples of 8) times the batch size
            self.model.language_model.encoder.compile()  # in place: the weights' names stay

    def begin_epoch(self, epoch: int, order: torch.Tensor) -> int:
        rank, world = rank_world()
        device = self.runtime.device
        if self.cuda:  # each epoch's peak memory, for sizing the batch and the profile on a GPU
            torch.cuda.reset_peak_memory_stats(device)
        # the masked fields drawn on the host, batch by batch: each batch's MLM size is known there
        self.masks = self.model.masker.plan_epoch(order, self.host_rows, self.batch_size,
                                                  self.generators["choice"], self.model.config.mlm, device,
                                                  rank, world)
        # losses add up on the device and are read once per epoch: no step waits on the host
        self.sums = {k: torch.zeros((), device=device) for k in (*OBJECTIVES, "loss")}
        self.lost = torch.zeros((), dtype=torch.long, device=device)
        self.epoch = epoch
        return self.steps_per_epoch

    def step_inputs(self, step: int, batch: dict[str, torch.Tensor]) -> dict:
        """The forward's arguments for batch ``step`` (of this epoch, in order): its inputs, the
        masks drawn ahead and, where the fields were drawn ahead, MTM's noise (the forward's only
        draw left: drawn here instead, the same numbers from the same generator), so that the
        forward draws nothing (``generator`` None) and can be captured whole
        (:mod:`~flipctr.training.trace`)."""
        inputs = {**batch, **self.masks.batch(step), "generator": self.generators["masking"]}
        mtm = self.model.mtm_head
        if "tab_fields" in inputs and "text_fields" in inputs:
            if mtm is not None:
                rows_global = len(inputs["ids"]) * inputs["tab_fields"].shape[1] * rank_world()[1]
                inputs["nce_noise"] = mtm.sample_noise(rows_global, self.model.config.nce_noise, inputs["generator"])
            inputs["generator"] = None
        return inputs

    def loss(self, step: int, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        inputs = self.step_inputs(step, batch)
        with self.runtime.autocast():
            out = self.wrapped(**inputs)
        self.sums["loss"] += out.loss.detach()
        for name in OBJECTIVES:
            value = getattr(out, name)
            if value is not None:
                self.sums[name] += value.detach()
        self.lost += out.text_fields_lost
        return out.loss

    def after_step(self, step: int, loss: torch.Tensor) -> bool:
        self.step_count += 1
        if self.on_step is not None:  # a callback reads the loss, and so waits for it
            self.on_step(self.epoch, step, loss.item())
        if self.sizer is not None:
            self.sizer.after_step(self.step_count)
        return False

    def stop_before(self) -> bool:
        return self.step_count >= self.schedule.total

    def end_epoch(self, epoch: int, steps: int, seconds: float) -> bool:
        cfg, world = self.cfg, rank_world()[1]
        done = self.step_count >= self.schedule.total  # every planned step, or as many as the budget sized
        rows = min(len(self.data), steps * cfg.batch_size * world)
        record = {"epoch": epoch, "lr": self.scheduler.get_last_lr()[0], "seconds": round(seconds, 1),
                  "samples_per_second": round(rows / max(seconds, 1e-9), 1), "text_fields_lost": int(self.lost),
                  "steps": steps, "rows": rows,
                  **{k: float(v) / max(steps, 1) for k, v in self.sums.items()
                     if k == "loss" or getattr(self.model.config, k, False)}}
        if self.schedule.total < self.planned and done:
            record["stopped_by_budget"] = True
            log.info("pretraining stopped by its %.0f s time budget after %d of %d planned steps "
                     "(epoch %d: %d of %d steps)", cfg.max_seconds, self.step_count, self.planned, epoch, steps,
                     self.steps_per_epoch)
        if self.cuda:
            record["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(self.runtime.device) / 2**20, 1)
        self.history.append(record)
        log.info("pretrain epoch %d  %s  %.0f samples/s%s", epoch,
                 "  ".join(f"{k} {record[k]:.4f}" for k in ("loss", *OBJECTIVES) if k in record),
                 record["samples_per_second"],
                 f"  peak {record['peak_gpu_memory_mib']:.0f} MiB" if self.cuda else "")
        self.tracker.scalars(epoch * self.steps_per_epoch, {f"pretrain/{k}": record[k] for k in
                                                           ("loss", *OBJECTIVES, "lr", "samples_per_second")
                                                           if k in record})
        if rank_world()[0] == 0:
            save_weights(self.model, self.owner.folder.pretrained)
            write_json(self.owner.folder.pretrain_history, self.history)
        return done
