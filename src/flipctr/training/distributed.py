"""The one place that decides the process group and the device of this process.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_distributed` creates the process group from
the environment: NCCL with one GPU per ``LOCAL_RANK`` where CUDA exists, gloo on CPUs. Without
it everything runs as one process.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (once); returns ``(rank, world size)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return rank_world()


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
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """``train.device``: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
    Under torchrun on CUDA each process takes the GPU of its ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and rank_world()[1] > 1:
        return torch.device("cuda", local_rank())
    return torch.device(name)
