"""Noise schedules: betas -> alphas_cumprod, SNR and sigmas of the discrete-time forward process.

The forward process is q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I) for
t in [0, T). The beta formulas and names follow diffusers' ``DDPMScheduler`` (``linear``,
``scaled_linear``, ``squaredcos_cap_v2`` and ``rescale_betas_zero_snr``), so a model trained here
samples with the diffusers scheduler of the same configuration and vice versa.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas linear in t (Ho et al. 2020, DDPM). Returns float64 (T,)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Betas linear in sqrt(beta), the Stable Diffusion schedule. Returns float64 (T,)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021, Improved DDPM). Returns float64 (T,).

    alpha_bar(u) = cos((u + s) / (1 + s) * pi/2)^2 on u in [0, 1]; beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T),
    capped at ``max_beta`` because alpha_bar(1) is 0 (diffusers' ``squaredcos_cap_v2``).
    """

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((t + 1) / num_train_timesteps) / alpha_bar(t / num_train_timesteps), max_beta)
        for t in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last step has SNR exactly 0 (Lin et al. 2023, Algorithm 1). (T,) -> (T,).

    sqrt(alphas_cumprod) is shifted so its last value is 0 and scaled so its first value is unchanged;
    the last beta becomes 1, so x_{T-1} is pure noise, as the sampler's starting point assumes.
    Models trained on such a schedule need ``v_prediction`` (epsilon cannot recover x0 at SNR 0).
    """
    alphas_cumprod_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_cumprod_sqrt[0].clone(), alphas_cumprod_sqrt[-1].clone()
    alphas_cumprod_sqrt = (alphas_cumprod_sqrt - last) * first / (first - last)
    alphas_cumprod = alphas_cumprod_sqrt**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


BETA_SCHEDULES = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
}


class NoiseSchedule:
    """The discrete noise schedule of a diffusion model, built by Hydra
    (``_target_: ldm.diffusion.schedules.NoiseSchedule``).

    Attributes, float32 CPU tensors of shape (T,): ``betas``, ``alphas`` (1 - betas),
    ``alphas_cumprod``, ``snr`` (alphas_cumprod / (1 - alphas_cumprod)) and ``sigmas``
    (sqrt((1 - alphas_cumprod) / alphas_cumprod), the noise level of the Euler / k-diffusion
    parametrisation x = x0 + sigma * eps). ``num_train_timesteps``: T.
    They are computed in float64 and stored in float32.

    ``beta_start`` and ``beta_end`` are used by ``linear`` and ``scaled_linear``; ``cosine`` has none.
    With ``zero_terminal_snr`` the last step has SNR 0 and sigma infinity; train it with v_prediction.
    """

    def __init__(
        self,
        schedule: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> None:
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {sorted(BETA_SCHEDULES)}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={num_train_timesteps}; a schedule needs at least 2 steps")
        if schedule == "cosine":
            betas = cosine_betas(num_train_timesteps)
        else:
            betas = BETA_SCHEDULES[schedule](num_train_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

        self.schedule = schedule
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.zero_terminal_snr = zero_terminal_snr
        self.betas = betas.float()
        self.alphas = (1.0 - betas).float()
        self.alphas_cumprod = alphas_cumprod.float()
        self.snr = (alphas_cumprod / (1.0 - alphas_cumprod)).float()
        self.sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt().float()

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(schedule={self.schedule!r}, num_train_timesteps={self.num_train_timesteps}, "
            f"zero_terminal_snr={self.zero_terminal_snr})"
        )
