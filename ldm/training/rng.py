"""Random state that a resumed run reproduces exactly: reseeded per training batch, saved in checkpoints."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def batch_seed(seed: int, rank: int, batch_index: int) -> int:
    """A 63-bit seed for one rank's ``batch_index``-th training batch, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, rank, batch_index]).generate_state(1, np.uint64)[0] >> 1)


def rng_states() -> dict[str, Any]:
    """The global random states of Python, numpy, torch (CPU) and every CUDA device, as tensors and
    plain values (so that checkpoints load with ``torch.load(weights_only=True)``)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned (CUDA states only where the device count matches)."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class BatchSeeding(L.Callback):
    """Seeds the global generators before each training batch from (seed, rank, batches trained so far).

    The training step draws timesteps, noise and the VAE posterior sample from torch's global
    generator. Other consumers of that generator run a varying number of times around a resume
    (dataloader iterators draw their base seed when created, validation runs at checkpoint steps),
    so restoring one saved state cannot replay the stream; a seed per batch does, on every rank and
    with any number of restarts. The counter and the global states at saving time go into the checkpoint.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.batches_trained = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        seed = batch_seed(self.seed, trainer.global_rank, self.batches_trained)
        torch.manual_seed(seed)  # also seeds every CUDA device
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning runs ModelCheckpoint's hooks after all other callbacks', so a checkpoint written
        # at this batch counts it.
        self.batches_trained += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batches_trained": self.batches_trained, "rng_states": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint was trained with seed={state_dict['seed']} but this run has seed={self.seed}; "
                f"set seed={state_dict['seed']} to continue the same run"
            )
        self.batches_trained = int(state_dict["batches_trained"])
        set_rng_states(state_dict["rng_states"])
