"""EDM (Karras et al. 2022): preconditioning, log-normal noise levels, the loss weight and the samplers.

Data are noised as x = x0 + sigma eps. The network F sees c_in x and c_noise(sigma), and the denoiser
is D(x; sigma) = c_skip x + c_out F (Table 1, "ours"):
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4,
with sd = sigma_data. Training draws ln(sigma) ~ N(P_mean, P_std^2) and weights the squared error of D
by lambda = (sigma^2 + sd^2) / (sigma sd)^2, which makes the error of F unweighted (lambda c_out^2 = 1).
This matches diffusers' ``EDMEulerScheduler`` with ``prediction_type="epsilon"`` (its name for F).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.karras import make_karras_sigmas, sample_karras

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor, Tensor], None]


def edm_preconditioning(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) at noise levels ``sigma`` (any shape, each returned in that shape)."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def _per_sample(sigma: Tensor, like: Tensor) -> Tensor:
    return sigma.to(like.device, torch.float64).view((-1,) + (1,) * (like.ndim - 1))


def edm_denoised(model_output: Tensor, x: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """D(x; sigma) = c_skip x + c_out F. model_output (F), x: (B, ...); sigma: (B,)."""
    c_skip, c_out, _, _ = edm_preconditioning(_per_sample(sigma, x), sigma_data)
    return (c_skip * x + c_out * model_output).to(x.dtype)


def edm_training_target(x0: Tensor, noise: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """The F that makes D exact: (x0 - c_skip (x0 + sigma noise)) / c_out. x0, noise: (B, ...); sigma: (B,)."""
    sigma = _per_sample(sigma, x0)
    c_skip, c_out, _, _ = edm_preconditioning(sigma, sigma_data)
    return ((x0 - c_skip * (x0 + sigma * noise)) / c_out).to(x0.dtype)


def edm_model_input(x: Tensor, sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """(c_in x (B, ...), c_noise (B,) float32): what the network is called with at x, sigma (B,)."""
    _, _, c_in, c_noise = edm_preconditioning(sigma.double(), sigma_data)
    return (x * _per_sample(c_in, x)).to(x.dtype), c_noise.float().to(x.device)


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (B,), the weight of the squared error of D."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_sigmas_from_quantiles(u: Tensor, p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """Training noise levels sigma = exp(P_mean + P_std Phi^-1(u)) (B,) from uniform quantiles u (B,):
    ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1: -1.2, 1.2)."""
    return torch.exp(p_mean + p_std * torch.special.ndtri(u))


@torch.no_grad()
def sample_edm(
    denoise: Denoiser,
    noise: Tensor,
    num_inference_steps: int = 18,
    sigma_data: float = 1.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    second_order: bool = True,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Sample an EDM-preconditioned model: x = sigma_max noise (B, C, H, W), then Algorithm 2 (Heun; Euler
    without ``second_order``) over ``num_inference_steps`` Karras sigmas and a final 0; returns x at sigma 0.

    ``denoise(c_in x, c_noise)`` returns F (guidance wraps it: D is affine in F with the same c_skip x,
    so guiding F guides D). Defaults are the paper's (18 steps, rho 7, sigma in [0.002, 80]).
    """
    sigmas = make_karras_sigmas(sigma_min, sigma_max, num_inference_steps, rho)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])

    def denoised(x: Tensor, sigma: float) -> Tensor:
        sigma_batch = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        model_input, c_noise = edm_model_input(x, sigma_batch, sigma_data)
        return edm_denoised(denoise(model_input, c_noise), x, sigma_batch, sigma_data)

    x = noise * sigmas[0].item()
    return sample_karras(denoised, x, sigmas, second_order, s_churn, s_tmin, s_tmax, s_noise, generator, callback)

