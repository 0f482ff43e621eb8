"""A guard for hyperparameter sweeps with several processes: every rank of a trial trains with the same values."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch.distributed as dist

from ldm.ranks import rank_and_world_size


def check_same_on_all_ranks(values: dict[str, Any]) -> None:
    """Raise RuntimeError, on every rank, if any rank's ``values`` differ from rank 0's (no-op with one process)."""
    _, world_size = rank_and_world_size(from_launcher=False)
    if world_size == 1:
        return
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, dict(values))
    reference = gathered[0]
    differing = {rank: {k: v for k, v in other.items() if reference.get(k) != v} for rank, other in enumerate(gathered)}
    differing = {rank: diff for rank, diff in differing.items() if diff}
    if differing:
        raise RuntimeError(
            f"the ranks of this trial train with different hyperparameters: rank 0 has {reference}, "
            + "; ".join(f"rank {rank} has {diff}" for rank, diff in differing.items())
            + ". Each rank re-ran the sweeper: seed its sampler (hydra.sweeper.sampler.seed=...) or launch "
            "trials with hydra/launcher=slurm, which gives all ranks of a trial one config"
        )


class SameHyperparametersOnAllRanks(L.Callback):
    """At the start of fit, checks that every rank got the same ``hyperparameters`` (e.g. the swept values)."""

    def __init__(self, hyperparameters: dict[str, Any]) -> None:
        self.hyperparameters = dict(hyperparameters)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_same_on_all_ranks(self.hyperparameters)
