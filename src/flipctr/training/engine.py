"""The one training loop: each epoch's plan (order -> shard -> batch widths), the hot step loop,
and an epoch's checkpoint (written and resumed through :mod:`flipctr.runtime.checkpoints`, on the
device and in the precision of :class:`~flipctr.runtime.device.Runtime`).

Finetuning (:class:`~.trainer.Trainer`) and pretraining (:class:`~.pretrain.Pretrainer`) are
:class:`Stage` s that :meth:`Engine.fit` runs: they supply what differs, a step's loss, what
happens after a step (evaluation, early stopping, a time budget's schedule) and what an epoch
records.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.batching import DeviceRows
from ..runtime.checkpoints import (
    load_checkpoint,
    random_states,
    restore_random_states,
    save_checkpoint,
)
from ..runtime.device import Runtime
from ..runtime.distributed import rank_world
from .budget import Budget

log = logging.getLogger("flipctr")


def shard_size(rows: int) -> int:
    """Rows per rank: every rank the same number, hence the same number of steps."""
    return math.ceil(rows / rank_world()[1])


def global_order(split: DeviceRows, generator: torch.Generator, batch_size: int, buckets: int) -> torch.Tensor:
    """One epoch's order of every rank's rows (host), the same on every rank: one seeded order for
    the global batch (world × ``batch_size`` rows, length-bucketed), padded by its first rows to
    equal shards (as DistributedSampler does), so that the ranks' collectives have equal shapes."""
    world = rank_world()[1]
    perm = split.order(generator, batch_size * world, buckets)
    return torch.cat([perm, perm[:shard_size(len(split)) * world - len(split)]])


class Stage:
    """One training stage as :meth:`Engine.fit` runs it: the hooks are what differs between
    finetuning and pretraining. Set by the stage: ``model`` (the unwrapped module, on the
    device: its weights are checkpointed), ``wrapped`` (``model`` under :meth:`Runtime.wrap`),
    ``optimizer``, ``scheduler`` (stepped after each step, or None), ``generators`` (named
    generators checkpointed with the run; ``shuffle`` orders each epoch), ``names`` (the batch
    inputs), ``batch_size``, ``length_buckets``, ``epochs`` (the last epoch), ``max_seconds`` (the
    stage's time budget, or None), ``desc`` and ``progress``."""

    model: nn.Module
    wrapped: nn.Module
    optimizer: object
    scheduler: object | None = None
    generators: dict[str, torch.Generator]
    names: tuple[str, ...]
    batch_size: int
    length_buckets: int
    epochs: int
    max_seconds: float | None = None
    name: str = "train"  # in the log
    desc: str = "epoch"  # in the progress bar
    progress: bool = True

    def begin(self, budget: Budget) -> None:
        """Before the first epoch of this call (after a resume restored the stage's state)."""

    def begin_epoch(self, epoch: int, order: torch.Tensor) -> int:
        """Called with the epoch's global row order (every rank's rows, host); returns the
        number of steps to run in this epoch."""
        raise NotImplementedError

    def loss(self, step: int, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, step: int, loss: torch.Tensor) -> bool:
        """After each optimizer step; True ends the stage."""
        return False

    def stop_before(self) -> bool:
        """Before each step; True ends the epoch."""
        return False

    def end_epoch(self, epoch: int, steps: int, seconds: float) -> bool:
        """After an epoch of ``steps`` steps and ``seconds`` of training; True: the stage is done."""
        raise NotImplementedError

    def state(self) -> dict:
        """What a resume needs beyond weights, optimizer, scheduler and random states."""
        return {}

    def load_state(self, state: dict) -> None:
        pass


class Engine:
    """Runs a :class:`Stage` epoch by epoch on a :class:`Runtime`: each epoch's plan (one seeded
    order of the global batch, this rank's shard, each batch's text width), the step loop, and a
    checkpoint after every epoch (rank 0, atomically: the weights, the optimizer and scheduler,
    every random state, the seconds used and the stage's own state), from which ``resume`` goes on
    as an uninterrupted fit would."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def fit(self, stage: Stage, data: DeviceRows, checkpoint: Path | None = None, resume: bool = False) -> None:
        rank, world = rank_world()
        start, done, used = 1, False, 0.0
        if resume and checkpoint is not None and checkpoint.exists():
            state = load_checkpoint(checkpoint)
            stage.model.load_state_dict(state["model"])
            stage.optimizer.load_state_dict(state["optimizer"])
            if stage.scheduler is not None:
                stage.scheduler.load_state_dict(state["scheduler"])
            restore_random_states(state, stage.generators)
            stage.load_state(state["stage"])
            start, done, used = state["epoch"] + 1, state["done"], state["seconds"]
            log.info("resumed %s after epoch %d%s", stage.name, state["epoch"], " (it had ended)" if done else "")
        budget = Budget(stage.max_seconds, used)
        stage.begin(budget)
        try:
            for epoch in range(start, stage.epochs + 1 if not done else start):
                stage.wrapped.train()
                order = global_order(data, stage.generators["shuffle"], stage.batch_size, stage.length_buckets)
                perm = order[rank::world]
                steps = stage.begin_epoch(epoch, order)
                ran, seconds = self._run_epoch(stage, data, epoch, perm, steps)
                done = stage.end_epoch(epoch, ran, seconds) or epoch == stage.epochs
                if checkpoint is not None and rank == 0:
                    state = {"epoch": epoch, "done": done, "seconds": budget.elapsed(),
                             "model": stage.model.state_dict(), "optimizer": stage.optimizer.state_dict(),
                             "stage": stage.state(), **random_states(stage.generators)}
                    if stage.scheduler is not None:
                        state["scheduler"] = stage.scheduler.state_dict()
                    save_checkpoint(checkpoint, state)
                if done:
                    break
        finally:
            # released here, not left to the garbage collector: a DDP wrapper destroyed after its
            # process group aborts the process
            stage.wrapped = None

    def _run_epoch(self, stage: Stage, data: DeviceRows, epoch: int, perm: torch.Tensor, steps: int
                   ) -> tuple[int, float]:
        """The hot loop: up to ``steps`` steps over this rank's rows ``perm`` (host) in the stage's
        batches, each gathered on the device, its loss from the stage, one optimizer (and
        scheduler) step. Nothing here waits on the host; the stage's ``after_step`` may evaluate
        and end the stage, its ``stop_before`` end the epoch. Returns (steps run, seconds)."""
        bs, widths = stage.batch_size, data.batch_widths(perm, stage.batch_size)
        perm = perm.to(self.runtime.device)
        ran, tick = 0, time.perf_counter()
        for step in tqdm(range(steps), desc=f"{stage.desc} {epoch}", disable=not stage.progress, leave=False,
                         mininterval=2.0, unit="batch"):
            if stage.stop_before():
                break
            rows = perm[step * bs:(step + 1) * bs]
            loss = stage.loss(step, data.batch(rows, stage.names, widths[step] if widths else None), rows)
            stage.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stage.optimizer.step()
            if stage.scheduler is not None:
                stage.scheduler.step()
            ran += 1
            if stage.after_step(step, loss):
                break
        return ran, time.perf_counter() - tick
