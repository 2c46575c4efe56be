"""Modality-alignment pretraining loop (FLIP 3.3): AdamW, warm-up then cosine decay, a
checkpoint every epoch (weights as safetensors, optimizer/scheduler/RNG state beside them) so a
killed run resumes where it stopped, and per-objective loss curves (log, JSON, PNG)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ..config import PretrainConfig
from ..data.batching import DeviceRows
from ..utils import atomic_path, write_json
from .budget import Budget, agree_any, agree_min
from .distributed import rank_world
from .engine import (Runtime, StepLoop, global_order, load_checkpoint, random_states,
                     restore_random_states, save_checkpoint, save_weights, shard_size)
from .tracking import Tracker

log = logging.getLogger("flipctr")
OBJECTIVES = ("mlm", "mtm", "icl")


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

    names = ("ids", "input_ids", "attention_mask", "value_spans")

    def __init__(self, cfg: PretrainConfig, runtime: Runtime | torch.device, folder: Path):
        """``runtime``: where and in which precision to compute (a bare device: in ``cfg.amp``'s)."""
        self.cfg, self.folder = cfg, Path(folder)
        self.runtime = runtime if isinstance(runtime, Runtime) else Runtime.create(runtime, cfg.amp)
        self.device = self.runtime.device

    @property
    def weights_path(self) -> Path:
        return self.folder / "pretrained.safetensors"

    @property
    def state_path(self) -> Path:
        return self.folder / "pretrain_state.pt"

    def fit(self, model: torch.nn.Module, data: DeviceRows, resume: bool = False,
            on_step: Callable[[int, int, float], None] | None = None) -> list[dict]:
        """Pretrain for ``cfg.epochs``; with ``resume`` continue from the last saved epoch."""
        cfg = self.cfg
        rank, world = rank_world()
        self.folder.mkdir(parents=True, exist_ok=True)
        model.to(self.device)
        # module: the unwrapped model (its config, weights, checkpoints); under DDP the backbone's
        # logit layer (and heads switched off) get no gradient in pretraining
        module, model = model, self.runtime.wrap(model, find_unused=True)
        params = [p for p in model.parameters() if p.requires_grad]
        # fused: one pass over every tensor (a trained encoder + MLM head are ~36M parameters)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        steps_per_epoch = math.ceil(shard_size(len(data)) / cfg.batch_size)
        planned = steps_per_epoch * cfg.epochs
        schedule = CosineSchedule(cfg.warmup_steps, planned)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        shuffle = torch.Generator().manual_seed(cfg.seed)
        # masks and NCE noise are drawn alike on every rank for every rank's rows, each rank keeping
        # its own: a row's draws do not depend on the rank that holds it (DDP equals one process)
        masking = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        choice = torch.Generator().manual_seed(cfg.seed + 3)  # the masked fields, drawn per epoch
        torch.manual_seed(cfg.seed + 2 + rank)  # dropout: per rank
        history: list[dict] = []
        start_epoch, used, done = 1, 0.0, False
        tracker = Tracker(self.folder / "tensorboard")
        generators = {"shuffle": shuffle, "masking": masking, "choice": choice}
        if resume and self.state_path.exists():
            state = load_checkpoint(self.state_path)
            module.load_state_dict(load_file(str(self.weights_path), device=str(self.device)))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            restore_random_states(state, generators)
            history, start_epoch = state["history"], state["epoch"] + 1
            used, done = state.get("seconds", 0.0), state.get("done", False)
            log.info("resumed pretraining after epoch %d%s", state["epoch"],
                     " (it had used its time budget)" if done else "")
        budget = Budget(cfg.max_seconds, used)
        sizer = ScheduleSizer(budget, schedule, self.runtime) if budget.limited else None
        step_count = scheduler.last_epoch  # optimizer steps taken, an earlier call's included
        if cfg.compile:  # the encoder's shapes: a few bucket widths (multiples of 8) times the batch size
            module.language_model.encoder.compile()  # in place: the weights' names stay
        spans, lengths = data.host("value_spans"), data.host("lengths")
        cuda = self.device.type == "cuda"
        loop = StepLoop(optimizer, scheduler, cfg.progress, desc="pretrain")
        for epoch in range(start_epoch, cfg.epochs + 1 if not done else start_epoch):
            model.train()
            if cuda:  # each epoch's peak memory, for sizing the batch and the profile on a GPU
                torch.cuda.reset_peak_memory_stats(self.device)
            order = global_order(data, shuffle, cfg.batch_size, cfg.length_buckets)
            perm = order[rank::world]
            widths = data.batch_widths(perm, cfg.batch_size)
            # the masked fields drawn on the host for the whole epoch: each batch's MLM size is known there
            masks = module.masker.plan_epoch(order, spans, lengths, cfg.batch_size, choice, module.config.mlm,
                                             self.device, rank, world)
            # losses add up on the device and are read once per epoch: no step waits on the host
            sums = {k: torch.zeros((), device=self.device) for k in (*OBJECTIVES, "loss")}
            lost = torch.zeros((), dtype=torch.long, device=self.device)

            def loss_of(step: int, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
                nonlocal lost
                batch.update(masks.batch(step, cfg.batch_size))
                with self.runtime.autocast():
                    out = model(**batch, generator=masking)
                sums["loss"] += out.loss.detach()
                for name in OBJECTIVES:
                    value = getattr(out, name)
                    if value is not None:
                        sums[name] += value.detach()
                lost += out.text_fields_lost
                return out.loss

            def after_step(step: int, loss: torch.Tensor) -> bool:
                nonlocal step_count
                step_count += 1
                if on_step is not None:  # a callback reads the loss, and so waits for it
                    on_step(epoch, step, loss.item())
                if sizer is not None:
                    sizer.after_step(step_count)
                return False

            steps, seconds = loop.run_epoch(epoch, data, perm.to(self.device), widths, self.names, cfg.batch_size,
                                            steps_per_epoch, loss_of, after_step,
                                            stop_before=lambda: step_count >= schedule.total)
            done = step_count >= schedule.total  # every planned step, or as many as the budget sized
            rows = min(len(data), steps * cfg.batch_size * world)
            record = {"epoch": epoch, "lr": scheduler.get_last_lr()[0], "seconds": round(seconds, 1),
                      "samples_per_second": round(rows / max(seconds, 1e-9), 1), "text_fields_lost": int(lost),
                      "steps": steps, "rows": rows,
                      **{k: float(v) / max(steps, 1) for k, v in sums.items()
                         if k == "loss" or getattr(module.config, k, False)}}
            if schedule.total < planned and done:
                record["stopped_by_budget"] = True
                log.info("pretraining stopped by its %.0f s time budget after %d of %d planned steps "
                         "(epoch %d: %d of %d steps)", cfg.max_seconds, step_count, planned, epoch, steps,
                         steps_per_epoch)
            if cuda:
                record["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            history.append(record)
            log.info("pretrain epoch %d  %s  %.0f samples/s%s", epoch,
                     "  ".join(f"{k} {record[k]:.4f}" for k in ("loss", *OBJECTIVES) if k in record),
                     record["samples_per_second"],
                     f"  peak {record['peak_gpu_memory_mib']:.0f} MiB" if cuda else "")
            tracker.scalars(epoch * steps_per_epoch, {f"pretrain/{k}": record[k] for k in
                                                      ("loss", *OBJECTIVES, "lr", "samples_per_second") if k in record})
            if rank == 0:
                self._checkpoint(module, optimizer, scheduler, generators, history, epoch, budget.elapsed(), done)
            if done:
                break
        tracker.close()
        if rank == 0:
            self._plot(history)
        return history

    def _checkpoint(self, model, optimizer, scheduler, generators, history, epoch, seconds, done) -> None:
        save_weights(model, self.weights_path)
        save_checkpoint(self.state_path, {"epoch": epoch, "optimizer": optimizer.state_dict(),
                                          "scheduler": scheduler.state_dict(), **random_states(generators),
                                          "history": history, "seconds": seconds, "done": done})
        write_json(self.folder / "pretrain_history.json", history)

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
        with atomic_path(self.folder / "pretrain_losses.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
