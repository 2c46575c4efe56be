"""The device and precision a process computes in, decided in one place (training, evaluation,
cached text vectors and ``predict`` alike)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PretrainConfig, TrainConfig
from .distributed import local_rank, rank_world


def resolve_device(name: str) -> torch.device:
    """``train.device``: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
    Under torchrun on CUDA each process takes the GPU of its ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and rank_world()[1] > 1:
        return torch.device("cuda", local_rank())
    return torch.device(name)


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

    @classmethod
    def of(cls, section: TrainConfig | PretrainConfig, device: str | torch.device | None = None) -> "Runtime":
        """What a training section asks for: its ``amp`` (an error names ``train.amp`` or
        ``pretrain.amp``) on ``device`` (None: ``train.device``'s "auto")."""
        setting = "pretrain.amp" if isinstance(section, PretrainConfig) else "train.amp"
        return cls.create(device if device is not None else getattr(section, "device", "auto"), section.amp, setting)

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
