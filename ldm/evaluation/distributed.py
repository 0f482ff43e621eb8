"""Splitting evaluation samples over processes and gathering per-sample results back in sample order.

Sample i always gets seed ``seed + i`` and lands at position i after gathering, so results do not
depend on how many processes made them. Without ``torch.distributed`` initialised there is one process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ldm.ranks import rank_and_world_size


def sample_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """The sample indices this rank makes: ``rank, rank + world_size, ...`` below ``num_samples``."""
    return list(range(rank, num_samples, world_size))


def gather_in_order(indices: list[int], values: Any) -> list[Any]:
    """Every rank's per-sample ``values`` (a tensor (n, ...) or a list of n items, for ``indices``), gathered
    onto every rank and put in sample order: item i of the result belongs to sample i."""
    items = list(values.cpu()) if isinstance(values, torch.Tensor) else list(values)
    if len(items) != len(indices):
        raise ValueError(f"{len(items)} values for {len(indices)} sample indices")
    pairs = list(zip(indices, items))
    _, world_size = rank_and_world_size(from_launcher=False)
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, pairs)
        pairs = [pair for part in gathered for pair in part]
    pairs.sort(key=lambda pair: pair[0])
    return [item for _, item in pairs]


def barrier() -> None:
    """Wait for all processes (no-op with one)."""
    if rank_and_world_size(from_launcher=False)[1] > 1:
        dist.barrier()
