"""Noise levels for a stratified validation loss: every sample at one level in each of K bins of equal
probability under the objective's own training distribution of noise levels.

Every objective draws its training levels from a uniform quantile u (``timestep_sampling.py``); the bins
are K equal-width intervals of u. Each bin then holds the same share of the training objective, so the
mean over bins is a stratified (lower-variance) estimate of exactly the quantity the optimizer minimises,
and a bin's curve says which part of the noise range a change helped. For discrete diffusion, whose t is
uniform, these are bins of equal width in t (the first of the two choices: equal log-SNR bins would give
the few extreme timesteps at either end of the schedule whole bins of their own); for flow matching and
EDM they follow their logit-normal and log-normal level distributions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.timestep_sampling import QUANTILE_EPSILON


def stratified_quantiles(generator: torch.Generator, num_bins: int) -> Tensor:
    """One quantile (num_bins,) float32 drawn uniformly inside each bin [k / K, (k + 1) / K)."""
    if num_bins <= 0:
        raise ValueError(f"num_bins={num_bins} must be positive")
    offsets = torch.rand(num_bins, generator=generator, dtype=torch.float64)
    u = (torch.arange(num_bins, dtype=torch.float64) + offsets) / num_bins
    return u.clamp(QUANTILE_EPSILON, 1 - QUANTILE_EPSILON).float()
