"""Which process this is among how many: the one rank and world-size lookup of ldm."""

from __future__ import annotations

import os

import torch.distributed as dist


def rank_and_world_size(from_launcher: bool = True) -> tuple[int, int]:
    """(rank, world size) of this process.

    From torch.distributed when a process group is initialised. Otherwise, with ``from_launcher``, from
    the launcher's ``RANK`` and ``WORLD_SIZE`` environment variables (torchrun and SLURM jobs set them
    before any process group exists, e.g. while data loaders or tools are built), else (0, 1). Code that
    runs collectives passes ``from_launcher=False``: without a process group it has no one to talk to.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not from_launcher:
        return 0, 1
    try:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as error:
        raise ValueError(f"the environment variables RANK={os.environ.get('RANK')!r} and "
                         f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} must be integers") from error
    if not 0 <= rank < world_size:
        raise ValueError(f"environment variable RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    return rank, world_size
