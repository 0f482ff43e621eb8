"""Exponential moving average of a module's weights, with the usual warm-up of the decay."""

from __future__ import annotations

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

        def multi_avg_fn(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
            decay_now = ema_decay_at(int(num_averaged), self.decay, self.warmup_steps)
            torch._foreach_lerp_(averaged, current, 1.0 - decay_now)

        super().__init__(model, multi_avg_fn=multi_avg_fn, use_buffers=True)
        self.requires_grad_(False)
