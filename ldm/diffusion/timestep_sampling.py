"""Uniform quantiles u in [0, 1] from which every objective draws its training noise levels, and the
timestep bias that samples more of a chosen range of them.

Each objective maps u to its own noise level: discrete diffusion t = floor(u T), flow matching through
``flow_timesteps_from_quantiles`` (uniform, logit-normal, mode), EDM sigma = exp(P_mean + P_std Phi^-1(u)).
A bias on u therefore means the same thing for all of them: "draw more often from this part of my
noise-level distribution" (u near 1: the noisiest draws), whatever that distribution is.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Keeps Phi^-1(u) and logit(t) finite: u stays within float32's resolution of the open interval (0, 1).
QUANTILE_EPSILON = 1e-5


def check_timestep_bias(begin: float, end: float, probability: float) -> None:
    """Raise a ValueError naming the key when the bias range or probability is out of [0, 1]."""
    if not 0.0 <= begin < end <= 1.0:
        raise ValueError(f"model.loss.timestep_bias_range=[{begin}, {end}]; need 0 <= begin < end <= 1 (quantiles "
                         f"of the objective's noise levels: 1 is the noisiest)")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"model.loss.timestep_bias_probability={probability}; it must lie in [0, 1]")


def sample_quantiles(
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    bias_range: tuple[float, float] | None = None,
    bias_probability: float = 0.0,
) -> Tensor:
    """Quantiles u (batch_size,) float32 in [QUANTILE_EPSILON, 1 - QUANTILE_EPSILON].

    Without a bias, u ~ U(0, 1). With ``bias_range=(begin, end)``, each u is drawn from U(begin, end) with
    probability ``bias_probability``, else from U(0, 1): the density is (1 - p) + p / (end - begin) inside
    the range and 1 - p outside. (diffusers' script's "multiplier" m over a range of width w is
    p = (m - 1) w / (1 + (m - 1) w).)
    """
    u = torch.rand(batch_size, generator=generator, device=device)
    if bias_range is not None and bias_probability > 0:
        begin, end = bias_range
        check_timestep_bias(begin, end, bias_probability)
        in_range = begin + (end - begin) * torch.rand(batch_size, generator=generator, device=device)
        chosen = torch.rand(batch_size, generator=generator, device=device) < bias_probability
        u = torch.where(chosen, in_range, u)
    return u.clamp(QUANTILE_EPSILON, 1 - QUANTILE_EPSILON)


def discrete_timesteps_from_quantiles(u: Tensor, num_train_timesteps: int) -> Tensor:
    """Integer timesteps floor(u T) (B,) int64 in [0, T): uniform for uniform u."""
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
