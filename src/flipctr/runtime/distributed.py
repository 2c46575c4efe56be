"""The one place that decides the process group of this process (its device: :mod:`.device`).

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`joined` creates the process group from the
environment (NCCL with one GPU per ``LOCAL_RANK`` where CUDA exists, gloo on CPUs) and destroys
it when the command ends. Without torchrun everything runs as one process.

The group must really be gone before the interpreter shuts down: its worker threads release
each collective's tensors after the collective has finished, and one that does so while Python
finalizes aborts the process ("terminate called without an active exception").
``destroy_process_group`` joins those threads only when it drops the last reference to the
group; :func:`leave` checks that it did.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

# Imported before any group exists: its functions take ``group=group.WORLD`` as a default
# argument, evaluated at import. Imported later (torch._dynamo imports it, e.g. when the first
# optimizer is built), they would hold the world group past ``destroy_process_group``.
import torch.distributed.nn  # noqa: F401


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (once); returns ``(rank, world size)``.
    ``backend``: NCCL where CUDA exists, else gloo, unless given."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)
    return rank_world()


@contextmanager
def joined(backend: str | None = None) -> Iterator[tuple[int, int]]:
    """The process group for the length of a command: ``with joined() as (rank, world): ...``.
    On success every rank waits for the others and leaves; on an error the group is destroyed
    without waiting (the other ranks may never get there)."""
    init_distributed(backend)
    try:
        yield rank_world()
    except BaseException:
        _destroy()
        raise
    leave()


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and logs."""
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def rank_rows(n: int) -> torch.Tensor:
    """This rank's share of ``n`` rows for work every rank needs all of (evaluation, frozen text
    vectors): every world-th row from its rank, the last ones wrapping round to row 0, so that all
    ranks hold ``ceil(n / world)`` (equal shapes for the gather). One process: all rows."""
    rank, world = rank_world()
    return torch.arange(rank, math.ceil(n / world) * world, world) % max(n, 1)


def gather_rows(share: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's :func:`rank_rows` share (ceil(n / world), ...) gathered back into the ``n``
    rows in order, on every rank (row i * world + k came from rank k)."""
    world = rank_world()[1]
    if world == 1 or n == 0:
        return share
    gathered = [torch.empty_like(share) for _ in range(world)]
    dist.all_gather(gathered, share)
    return torch.stack(gathered, 1).reshape(-1, *share.shape[1:])[:n]


def leave() -> None:
    """Leave the process group at the end of a command (every rank waits for the others first)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        _destroy()


def _destroy() -> None:
    """Destroy the process group, warning when something still holds it (its threads then live
    on into interpreter shutdown: see the module docstring)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.group.WORLD
    dist.destroy_process_group()
    if sys.getrefcount(world) > 2:  # ``world`` and getrefcount's argument
        warnings.warn(f"the process group is still referenced {sys.getrefcount(world) - 2} times after "
                      "destroy_process_group; its worker threads outlive it", RuntimeWarning, stacklevel=2)
