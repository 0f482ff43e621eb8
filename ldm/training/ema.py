"""Exponential moving average of a module's weights, with the usual warm-up of the decay."""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def ema_decay_at(num_averaged: int, max_decay: float, warmup_steps: int = 10) -> float:
    """Decay used after ``num_averaged`` updates: min(max_decay, (1 + n) / (warmup_steps + n)).

    Early on the average follows the weights closely; a fixed 0.9999 would keep the random
    initialisation in the average for ~10k steps, far longer than a short run lasts.
    """
    return min(max_decay, (1.0 + num_averaged) / (warmup_steps + num_averaged))


class EMAModel(AveragedModel):
    """EMA copy of ``model`` built on torch's ``AveragedModel`` (buffers averaged too).

    Lightning's ``WeightAveraging`` callback averages the whole LightningModule (frozen VAE and
    text encoder included) and swaps weights in place; a latent diffusion run wants the average of
    the trained U-Net alone, kept beside the raw weights, so that samples use the EMA while
    training continues. The copy never takes gradients (DDP would flag them as unused).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup_steps: int = 10) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay={decay} must lie in (0, 1), e.g. 0.999 for short runs")
        self.decay = decay
        self.warmup_steps = warmup_steps
        super().__init__(model, use_buffers=True)
        self.requires_grad_(False)
        # A weak reference: a module assigned as an attribute would become a submodule of the copy.
        self._pairs_for: weakref.ref[nn.Module] | None = None
        self._pairs: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] = ([], [], [], [])

    def _tensor_pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(averaged floating, model's floating, averaged other, model's other) tensors, paired in order.

        Collected once per model: walking a U-Net's few hundred modules for its parameters and buffers
        costs more than the average's arithmetic on a small model, and AveragedModel walks both modules
        twice per update. The lists hold the Parameter and buffer objects, so a move to another device or
        dtype (which keeps the objects) is seen. A tensor the copy shares with the model (a LoRA copy's
        frozen base weights, ``share_frozen_weights``) is left out: its average is itself.
        """
        if self._pairs_for is None or self._pairs_for() is not model:
            averaged_floating, model_floating, averaged_other, model_other = [], [], [], []
            ours = itertools.chain(self.module.parameters(), self.module.buffers())
            theirs = itertools.chain(model.parameters(), model.buffers())
            for averaged, current in itertools.zip_longest(ours, theirs):
                if averaged is None or current is None:
                    raise ValueError("EMA update: the model's parameters and buffers no longer match the copy's")
                if averaged is current:
                    continue
                floating = averaged.is_floating_point()
                (averaged_floating if floating else averaged_other).append(averaged)
                (model_floating if floating else model_other).append(current)
            self._pairs_for = weakref.ref(model)
            self._pairs = (averaged_floating, model_floating, averaged_other, model_other)
        return self._pairs

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Moves the copy's floating tensors toward ``model``'s by ``1 - ema_decay_at(n)`` (n updates so
        far; the first update copies), copies the other tensors (integer buffers), and counts the update."""
        averaged_floating, model_floating, averaged_other, model_other = self._tensor_pairs(model)
        updates = int(self.n_averaged)
        if updates == 0:
            torch._foreach_copy_(averaged_floating, model_floating)
        elif averaged_floating:
            torch._foreach_lerp_(averaged_floating, model_floating,
                                 1.0 - ema_decay_at(updates, self.decay, self.warmup_steps))
        if averaged_other:
            torch._foreach_copy_(averaged_other, model_other)
        self.n_averaged += 1
