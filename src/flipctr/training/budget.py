"""Wall-clock budgets of training stages (``pretrain.max_seconds``, ``train.max_seconds``,
``text_finetune.max_seconds``): a machine lent for minutes must see every stage end in time.

A budget counts the stage's own seconds, those of an earlier call that the stage resumes
included. Decisions that end a stage are agreed by every rank (the earliest stop wins), so
data-parallel ranks stop at the same step.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..runtime.distributed import rank_world

clock = time.perf_counter  # module-level so that tests can drive time


class Budget:
    """Seconds allowed for one stage (``None``: unlimited) and the seconds it has used."""

    def __init__(self, seconds: float | None, used: float = 0.0):
        if seconds is not None and seconds <= 0:
            raise ValueError(f"a time budget must be positive seconds or null, not {seconds!r}")
        self.seconds, self.used, self.started = seconds, used, clock()

    @property
    def limited(self) -> bool:
        return self.seconds is not None

    def elapsed(self) -> float:
        return self.used + clock() - self.started

    def remaining(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()


def agree_min(value: int, device: torch.device) -> int:
    """The smallest of every rank's ``value`` (one process: ``value``)."""
    if rank_world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def agree_any(flag: bool, device: torch.device) -> bool:
    """True when any rank says so."""
    return agree_min(0 if flag else 1, device) == 0
