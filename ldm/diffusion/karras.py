"""Karras et al. 2022 ("Elucidating the design space", EDM) in the sigma parametrisation x = x0 + sigma eps:
the rho-spaced sigma schedule and the Heun sampler of Algorithm 2 with optional churn.

Both are shared: EDM models sample with them directly (``edm.py``), and the discrete-schedule "heun"
sampler (``samplers.py``) runs the same loop on its schedule's sigmas.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

SigmaDenoiser = Callable[[Tensor, float], Tensor]  # (x (B, ...), sigma) -> D(x; sigma), the x0 estimate
StepCallback = Callable[[int, Tensor, Tensor], None]


def make_karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> Tensor:
    """Sigmas (num_steps,) from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def churn_gamma(sigma: float, num_steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """Algorithm 2's gamma_i: min(S_churn / N, sqrt(2) - 1) for sigma in [S_tmin, S_tmax], else 0."""
    return min(s_churn / num_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0


@torch.no_grad()
def sample_karras(
    denoised: SigmaDenoiser,
    x: Tensor,
    sigmas: Tensor,
    second_order: bool = True,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Karras et al. 2022, Algorithm 2: steps of dx/dsigma = (x - D(x; sigma)) / sigma over ``sigmas``
    (N + 1,) descending to 0, starting from x (B, ...) at sigmas[0]; returns x at sigmas[-1].

    With churn (S_churn > 0) each step first raises sigma to sigma_hat = sigma (1 + gamma) by adding
    noise of std sqrt(sigma_hat^2 - sigma^2) * S_noise. ``second_order`` (Heun): an Euler step, then the
    average of the slopes at both ends, except on the step to sigma 0, so N steps cost 2 N - 1 calls of
    ``denoised`` (18 steps: 35); without it, N Euler steps (Algorithm 2 without its correction).
    """
    sigmas = sigmas.tolist()
    num_steps = len(sigmas) - 1
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = churn_gamma(sigma, num_steps, s_churn, s_tmin, s_tmax)
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * fresh
        x0 = denoised(x, sigma_hat)
        derivative = (x - x0) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * derivative
        if second_order and sigma_next > 0:
            derivative_next = (x_next - denoised(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (derivative + derivative_next) / 2
        x = x_next
        if callback is not None:
            callback(i, x, x0)
    return x
