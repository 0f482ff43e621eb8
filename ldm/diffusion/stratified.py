"""Timesteps for a stratified validation loss: every sample at one timestep in each of K equal-width bins of t.

Bins are of equal width in t (not in log-SNR) because training draws t uniformly: each bin then holds
the same share of the training objective, so the mean over bins is a stratified (lower-variance)
estimate of exactly the quantity the optimizer minimises, and a bin's curve says which part of the
noise range a change helped. Equal log-SNR bins would give the few extreme timesteps at either end
of the schedule whole bins of their own.
"""

from __future__ import annotations

import torch
from torch import Tensor


def timestep_bin_edges(num_timesteps: int, num_bins: int) -> Tensor:
    """Integer edges (num_bins + 1,) splitting [0, num_timesteps) into ``num_bins`` bins of (almost) equal width."""
    if not 0 < num_bins <= num_timesteps:
        raise ValueError(f"num_bins={num_bins} must lie in [1, num_timesteps={num_timesteps}]")
    return torch.div(torch.arange(num_bins + 1) * num_timesteps, num_bins, rounding_mode="floor")


def stratified_timesteps(generator: torch.Generator, num_timesteps: int, num_bins: int) -> Tensor:
    """One timestep (num_bins,) int64 drawn uniformly inside each bin of ``timestep_bin_edges``."""
    edges = timestep_bin_edges(num_timesteps, num_bins)
    widths = edges[1:] - edges[:-1]
    offsets = (torch.rand(num_bins, generator=generator, dtype=torch.float64) * widths).long()
    return edges[:-1] + torch.minimum(offsets, widths - 1)
