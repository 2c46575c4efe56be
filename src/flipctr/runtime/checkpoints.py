"""What a run saves and reads back: weights as safetensors (whole or in shards), checkpoints with
every random state, and the seeding a model's construction starts from."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils import atomic_path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _shard_files(folder: Path, stem: str) -> list[Path]:
    files = sorted(Path(folder).glob(f"{stem}-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no {stem}-*.safetensors shards")
    return files


def shards_metadata(folder: Path, stem: str) -> dict[str, str]:
    """The ``metadata`` :func:`save_shards` put into the first shard's header."""
    with safe_open(str(_shard_files(folder, stem)[0]), "pt") as first:
        return first.metadata() or {}


def load_shards(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """The state :func:`save_shards` wrote as ``{stem}-*.safetensors`` in ``folder``, whole again."""
    files = _shard_files(folder, stem)
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
