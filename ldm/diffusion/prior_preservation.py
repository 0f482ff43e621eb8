"""DreamBooth's prior-preservation loss weighting: instance samples and the base model's own class samples."""

from __future__ import annotations

import torch
from torch import Tensor


def prior_preservation_weights(is_prior: Tensor, prior_loss_weight: float) -> Tensor:
    """Per-sample weights (B,) whose weighted sum of per-sample losses is
    ``mean(instance losses) + prior_loss_weight * mean(prior losses)``, DreamBooth's objective.

    ``is_prior``: (B,) bool, True for the class images the base model generated. A batch without
    instance (or without prior) samples weights the other kind alone.
    """
    is_prior = is_prior.bool()
    num_prior = is_prior.sum().clamp(min=1)
    num_instance = (~is_prior).sum().clamp(min=1)
    return torch.where(is_prior, prior_loss_weight / num_prior, 1.0 / num_instance).float()
