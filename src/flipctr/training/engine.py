"""The training floor, decided in one place: the device and precision a process computes in
(training, evaluation, cached text vectors, ``predict`` alike), data-parallel wrapping, each
epoch's plan (order -> shard -> batch widths), the step loop, and checkpoints with every
random state.

Finetuning (:class:`~.trainer.Trainer`) and pretraining (:class:`~.pretrain.Pretrainer`) run
on it and supply what differs: a step's loss, what happens after a step (evaluation, early
stopping, a time budget's schedule) and what an epoch records.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..data.batching import DeviceRows
from ..utils import atomic_path
from .distributed import rank_world, resolve_device


def bf16_supported(device: torch.device) -> bool:
    """Fast bf16 matmuls: CUDA with bf16, or a CPU with AMX/AVX512-BF16 (oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cap = torch.backends.cpu.get_cpu_capability()
        return cap in ("AVX512", "AMX") and _cpu_has_bf16()
    return False


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` setting ("auto", "bf16", "off"), or None for fp32."""
    if mode == "off":
        return None
    if mode == "bf16" or (mode == "auto" and bf16_supported(device)):
        return torch.bfloat16
    if mode != "auto":
        raise ValueError(f"train.amp must be 'auto', 'bf16' or 'off', not {mode!r}")
    return None


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision a process computes: the device, and the autocast dtype
    (None: fp32). Master weights stay fp32; a frozen encoder may hold its weights in
    ``amp_dtype`` (:meth:`frozen`)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None

    @classmethod
    def create(cls, device: str | torch.device = "auto", amp: str = "auto") -> "Runtime":
        device = resolve_device(device) if isinstance(device, str) else device
        return cls(device, autocast_dtype(amp, device))

    @property
    def amp_name(self) -> str:
        """The precision as a run folder records it ("bf16" or "off")."""
        return "bf16" if self.amp_dtype == torch.bfloat16 else "off"

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def frozen(self, module: nn.Module) -> nn.Module:
        """A frozen module on the device, its weights in the autocast dtype (no per-op casts)."""
        return module.to(device=self.device, dtype=self.amp_dtype or torch.float32)

    def wrap(self, model: nn.Module, find_unused: bool = False) -> nn.Module:
        """``model`` under DDP when the process group has several ranks (each rank a shard of
        every batch; DDP averages the gradients), else itself."""
        if rank_world()[1] == 1:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused)

    def synchronize(self) -> None:
        """Let the device finish its queued work (so that the host's clock measures it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class StepLoop:
    """The hot loop of every training stage, one epoch at a time: each batch gathered on the
    device, its loss computed by the stage (under :meth:`Runtime.autocast`), one optimizer step
    (and scheduler step). Nothing here waits on the host. A stage's ``after_step`` may evaluate
    inside :meth:`paused` (not counted as training time) and ask to stop; ``stop_before`` ends
    the epoch before a step (a time budget's schedule)."""

    def __init__(self, optimizer, scheduler=None, progress: bool = True, desc: str = "epoch"):
        self.optimizer, self.scheduler, self.progress, self.desc = optimizer, scheduler, progress, desc
        self._paused = 0.0

    @contextlib.contextmanager
    def paused(self):
        """Time spent in this block (an evaluation) is not training time."""
        tick = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - tick

    def run_epoch(self, epoch: int, split: DeviceRows, perm: torch.Tensor, widths: list[int] | None,
                  names: tuple[str, ...], batch_size: int, steps: int,
                  loss_of: Callable[[int, dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
                  after_step: Callable[[int, torch.Tensor], bool] | None = None,
                  stop_before: Callable[[], bool] | None = None) -> tuple[int, float]:
        """Up to ``steps`` steps over the rows ``perm`` (on the device) in batches of
        ``batch_size``; ``loss_of(step, batch, rows)`` -> the loss. Returns (steps run, seconds
        of training)."""
        self._paused, done, tick = 0.0, 0, time.perf_counter()
        for step in tqdm(range(steps), desc=f"{self.desc} {epoch}", disable=not self.progress, leave=False,
                         mininterval=2.0, unit="batch"):
            if stop_before is not None and stop_before():
                break
            rows = perm[step * batch_size:(step + 1) * batch_size]
            loss = loss_of(step, split.batch(rows, names, widths[step] if widths else None), rows)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            done += 1
            if after_step is not None and after_step(step, loss):
                break
        return done, time.perf_counter() - tick - self._paused


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


def plan_epoch(split: DeviceRows, generator: torch.Generator, batch_size: int, buckets: int
               ) -> tuple[torch.Tensor, list[int] | None]:
    """This rank's rows of one epoch, in order (host): every world-th row of :func:`global_order`
    from its rank; and each batch's text width (None without text)."""
    rank, world = rank_world()
    perm = global_order(split, generator, batch_size, buckets)[rank::world]
    return perm, split.batch_widths(perm, batch_size)


def random_states(generators: dict[str, torch.Generator]) -> dict:
    """Every random state a resume needs: torch's CPU and CUDA ones and the named generators'."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            **{f"{name}_rng": g.get_state() for name, g in generators.items()}}


def restore_random_states(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    for name, generator in generators.items():
        generator.set_state(state[f"{name}_rng"])


def save_weights(model: nn.Module, path: Path) -> None:
    """A model's weights as safetensors (a state dict, never a pickled module), atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def save_checkpoint(path: Path, state: dict) -> None:
    """``state`` (tensors, plain values) to ``path``, atomically: a kill leaves the last one whole."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, device: torch.device | None = None) -> dict:
    return torch.load(path, map_location=device, weights_only=True)
