"""What decides a run's arithmetic, recorded in every run folder, and the setting that pins it.

Two runs with one seed give the same digits only if the same kernels add in the same order. On
a CPU that order depends on the vector width ATen's kernels were chosen for (its CPU capability:
AVX2, AVX512, ...), on MKL's code path and blocking for fp32 matrix products (picked from the
instruction set and the caches it detects), on oneDNN's for bf16 ones (autocast), and on how many
threads split a reduction; on a GPU on the cuBLAS and cuDNN algorithms picked and on TF32.
:func:`arithmetic_info` records each of them.

``train.deterministic=true`` pins what can be pinned (:func:`pin_deterministic`): fp32 (no
autocast), ATen's kernels at AVX2, MKL's conditional numerical reproducibility in its
``COMPATIBLE`` branch (the one branch MKL honours on Intel and AMD alike), oneDNN capped at
AVX2, deterministic algorithms (on CUDA too: cuDNN, cuBLAS's workspace, no TF32). Its digits then
no longer depend on the instruction sets an x86-64 machine with AVX2 has beyond AVX2; they still
depend on the thread count and the library versions, which are recorded beside them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__

# Fixed at a process's first tensor operation (ATen), first MKL call, first oneDNN primitive.
DETERMINISTIC_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2",
                     "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
RECORDED_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16")
_MKL_CBWR_BRANCH = {1: "off", 2: "auto", 3: "compatible"}  # mkl_service.h: what mkl_cbwr_get(MKL_CBWR_BRANCH) returns


def _cpu() -> dict[str, Any]:
    """The CPU's model name and the instruction-set flags that choose kernels (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    have = set(flags.group(1).split()) if flags else set()
    return {"cpu_model": model.group(1).strip() if model else None, "cpu_flags": [f for f in CPU_FLAGS if f in have]}


def _library_versions() -> dict[str, str | None]:
    """MKL's and oneDNN's versions as torch was built with them."""
    shown = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", shown)
    onednn = re.search(r"MKL-DNN v([\w.]+)", shown)
    return {"mkl": mkl.group(1) if mkl else None, "onednn": onednn.group(1) if onednn else None}


def mkl_cbwr_branch() -> str | None:
    """MKL's reproducibility branch in this process ("off", "auto", "compatible", ...), None
    where torch has no MKL of its own to ask."""
    with contextlib.suppress(OSError, AttributeError):
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        branch = lib.mkl_serv_cbwr_get(1)
        return _MKL_CBWR_BRANCH.get(branch, str(branch))
    return None


def arithmetic_info(amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Everything that decides this process's arithmetic, for ``environment.json``."""
    info: dict[str, Any] = {
        "autocast": "bf16" if amp_dtype == torch.bfloat16 else "off",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **_cpu(),
        "threads": torch.get_num_threads(),
        **_library_versions(),
        "mkl_cbwr_branch": mkl_cbwr_branch(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
    }
    if torch.cuda.is_available():
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpu_capability=".".join(map(str, torch.cuda.get_device_capability())),
                    cudnn_deterministic=torch.backends.cudnn.deterministic,
                    cudnn_benchmark=torch.backends.cudnn.benchmark,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def pin_deterministic() -> None:
    """``train.deterministic``: pin the kernels' instruction sets and algorithms (module
    docstring). Raises when this process fixed them otherwise before (its first tensor
    operation came earlier): the digits would not be the pinned ones."""
    os.environ.update(DETERMINISTIC_ENV)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.ones(2, 2) @ torch.ones(2, 2)  # MKL reads MKL_CBWR at its first call
    problems = []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        problems.append(f"ATen's CPU kernels run at {capability}, not AVX2")
    branch = mkl_cbwr_branch()
    if branch not in (None, "compatible"):
        problems.append(f"MKL's reproducibility branch is {branch!r}, not 'compatible'")
    if problems:
        start = " ".join(f"{k}={v}" for k, v in DETERMINISTIC_ENV.items())
        raise RuntimeError(f"train.deterministic: {'; '.join(problems)}. These are fixed at a process's first "
                           f"tensor operation, which came before; start the process with {start}")


def environment_info(device: str | None = None, amp_dtype: Any = None) -> dict[str, Any]:
    """Versions and hardware facts recorded in every run folder, with what decides the run's
    arithmetic (``amp_dtype``: its autocast dtype, None for fp32)."""
    info: dict[str, Any] = {
        "flipctr": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    for name in ("pandas", "sklearn", "transformers"):
        with contextlib.suppress(ImportError):
            info[name] = __import__(name).__version__
    if device is not None:
        info["device"] = device
        if device.startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    info["arithmetic"] = arithmetic_info(amp_dtype)
    return info
