"""Ending DDP ranks together when their data runs out at different batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from ldm.ranks import rank_and_world_size


class EndTogether:
    """Iterates ``loader``; before each batch all ranks agree (one all-reduce of a flag) whether
    every rank still has one, and all stop when the first runs out.

    A finite stream (``mode="exactly_once"``) gives ranks different numbers of batches (shards hold
    different numbers of samples); a rank that stopped alone would leave the others waiting in
    DDP's gradient all-reduce for ever. The batches left on the other ranks are not used.
    Without an initialised process group it is the loader itself.
    """

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        if rank_and_world_size(from_launcher=False)[1] == 1:
            yield from self.loader
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        iterator = iter(self.loader)
        while True:
            batch = next(iterator, None)
            every_rank_has_one = torch.tensor([batch is not None], dtype=torch.int32, device=device)
            dist.all_reduce(every_rank_has_one, op=dist.ReduceOp.MIN)
            if not every_rank_has_one.item():
                return
            yield batch
