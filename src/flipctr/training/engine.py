"""The training floor, decided in one place: the device and precision a process computes in
(training, evaluation, cached text vectors, ``predict`` alike), data-parallel wrapping, each
epoch's plan (order -> shard -> batch widths), the hot step loop, and checkpoints with every
random state.

Finetuning (:class:`~.trainer.Trainer`) and pretraining (:class:`~.pretrain.Pretrainer`) are
:class:`Stage` s that :meth:`Engine.fit` runs: they supply what differs, a step's loss, what
happens after a step (evaluation, early stopping, a time budget's schedule) and what an epoch
records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..data.batching import DeviceRows
from ..utils import atomic_path
from .budget import Budget
from .distributed import rank_world, resolve_device

log = logging.getLogger("flipctr")


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


def autocast_dtype(mode: str, device: torch.device, setting: str = "train.amp") -> torch.dtype | None:
    """The autocast dtype for an ``amp`` setting ("auto", "bf16", "off"), or None for fp32
    (``setting``: its name, for the error)."""
    if mode == "off":
        return None
    if mode == "bf16" or (mode == "auto" and bf16_supported(device)):
        return torch.bfloat16
    if mode != "auto":
        raise ValueError(f"{setting} must be 'auto', 'bf16' or 'off', not {mode!r}")
    return None


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision a process computes: the device, and the autocast dtype
    (None: fp32). Master weights stay fp32; a frozen encoder may hold its weights in
    ``amp_dtype`` (:meth:`frozen`)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None

    @classmethod
    def create(cls, device: str | torch.device = "auto", amp: str = "auto", setting: str = "train.amp") -> "Runtime":
        device = resolve_device(device) if isinstance(device, str) else device
        return cls(device, autocast_dtype(amp, device, setting))

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


PART = "::part"  # a tensor split over shards: "{name}::part{k}of{n}", its rows k-th of n


def save_shards(state: dict[str, torch.Tensor], folder: Path, stem: str, max_bytes: int,
                dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> list[Path]:
    """``state`` (cast to ``dtype``) as safetensors files ``{stem}-00001.safetensors``, ... of at
    most ``max_bytes`` each, tensors kept whole where they fit and split by rows where they do
    not, packed largest first (what a machine that returns few, small files can carry);
    ``metadata`` goes into the first file's header. :func:`load_shards` reads them."""
    file_limit, max_bytes = max_bytes, max_bytes - 256  # the header's fixed part; each entry's is counted below
    pieces: list[tuple[str, torch.Tensor]] = []
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().to(dtype or tensor.dtype).contiguous()
        if tensor.numel() * tensor.element_size() + len(name.encode()) + 96 <= max_bytes or tensor.dim() == 0:
            pieces.append((name, tensor))
            continue
        row_bytes = tensor[0].numel() * tensor.element_size()
        if row_bytes > max_bytes - len(name.encode()) - 128:
            raise ValueError(f"{name}: one row ({row_bytes} bytes) is larger than a shard ({max_bytes} bytes)")
        parts = tensor.split((max_bytes - len(name.encode()) - 128) // row_bytes)
        pieces += [(f"{name}{PART}{k}of{len(parts)}", part.contiguous()) for k, part in enumerate(parts)]
    extra = len(json.dumps(metadata or {}).encode())
    shards: list[dict[str, torch.Tensor]] = []
    sizes: list[int] = []
    for name, tensor in sorted(pieces, key=lambda item: -item[1].numel() * item[1].element_size()):
        nbytes = tensor.numel() * tensor.element_size() + len(name.encode()) + 96  # its header entry, at most
        fits = [k for k, used in enumerate(sizes) if used + nbytes + (extra if k == 0 else 0) <= max_bytes]
        if not fits:
            shards.append({})
            sizes.append(0)
            fits = [len(shards) - 1]
        shards[fits[0]][name] = tensor
        sizes[fits[0]] += nbytes
    paths = []
    for k, shard in enumerate(shards, 1):
        paths.append(Path(folder) / f"{stem}-{k:05d}.safetensors")
        with atomic_path(paths[-1]) as tmp:
            save_file(shard, str(tmp), metadata=metadata if k == 1 else None)
            if tmp.stat().st_size > file_limit:
                raise ValueError(f"{paths[-1]}: {tmp.stat().st_size} bytes, over the {file_limit} asked for")
    return paths


def load_shards(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """The state :func:`save_shards` wrote as ``{stem}-*.safetensors`` in ``folder``, whole again."""
    files = sorted(Path(folder).glob(f"{stem}-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no {stem}-*.safetensors shards")
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for path in files:
        for name, tensor in load_weights(path).items():
            if PART in name:
                base, part = name.split(PART)
                k, counts[base] = map(int, part.split("of"))
                parts.setdefault(base, {})[k] = tensor
            else:
                state[name] = tensor
    for base, pieces in parts.items():
        if sorted(pieces) != list(range(counts[base])):
            raise CheckpointError(f"{folder}: {base} has parts {sorted(pieces)} of {counts[base]}; a shard is missing")
        state[base] = torch.cat([pieces[k] for k in range(counts[base])])
    return state


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be read (truncated, bad bytes)."""


def _damaged(path: Path, err: Exception, what: str) -> CheckpointError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(f"{path}: damaged {what} ({first_line}); {DAMAGE_ADVICE[what]}")


DAMAGE_ADVICE = {"checkpoint": "delete it to start this stage over (its run's other files stay)",
                 "weights": "delete the run folder and train it again"}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors state dict; a damaged file is one error naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, EOFError) as err:
        raise _damaged(path, err, "weights") from err


def save_checkpoint(path: Path, state: dict) -> None:
    """``state`` (tensors, plain values) to ``path``, atomically: a kill leaves the last one whole."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint on the host, whatever device wrote it: the random states must be CPU byte
    tensors (``set_rng_state`` takes nothing else); ``load_state_dict`` moves the weights and the
    optimizer's state to their parameters' device."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise _damaged(path, err, "checkpoint") from err


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
