"""Timestep and sigma grids of the discrete-schedule samplers, as diffusers 0.42's schedulers set them.

``make_timesteps`` spaces the inference timesteps ("leading", "trailing", "linspace"; Lin et al. 2023,
Table 2); the Euler-type and DPM-Solver samplers also need the schedule's sigmas
sigma = sqrt((1 - a) / a) at those timesteps (or Karras sigmas and their fractional timesteps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.karras import make_karras_sigmas

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Euler-type samplers need a finite sigma at every step. Where a zero-terminal-SNR schedule has
# alphas_cumprod == 0, use the smallest positive fp16 subnormal instead, as diffusers does.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def make_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    integer: bool = True,
) -> Tensor:
    """Descending timesteps (num_inference_steps,), spaced as diffusers defines them
    (Lin et al. 2023, Table 2), with n = num_inference_steps and T = num_train_timesteps:

    - ``leading``: k * (T // n) + steps_offset for k = n-1 .. 0 (never reaches T - 1);
    - ``trailing``: round(T - k * T / n) - 1 for k = 0 .. n-1 (starts at T - 1);
    - ``linspace``: n evenly spaced points from T - 1 down to 0, rounded.

    int64 when ``integer`` (DDPM, DDIM, DPM-Solver); otherwise float64 with ``linspace`` left
    unrounded, as diffusers' Euler schedulers use it. For ``trailing`` ldm always returns n steps,
    where diffusers' float ``np.arange`` gives n + 1 (the last one -1) for 62 values of n in 1..1000.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps}; it must lie in [1, num_train_timesteps={num_train_timesteps}]"
        )
    steps = torch.arange(num_inference_steps, dtype=torch.float64)
    if spacing == "leading":
        timesteps = (steps * (num_train_timesteps // num_inference_steps)).flip(0) + steps_offset
    elif spacing == "trailing":
        # numpy's arange arithmetic (start + k * ((start + step) - start)), so rounding ties fall alike.
        delta = (num_train_timesteps - num_train_timesteps / num_inference_steps) - num_train_timesteps
        timesteps = torch.round(num_train_timesteps + steps * delta) - 1
    elif spacing == "linspace":
        # numpy's linspace arithmetic (index * step, last point exact), so rounding ties fall alike.
        step = (num_train_timesteps - 1) / max(num_inference_steps - 1, 1)
        timesteps = steps * step
        timesteps[-1] = num_train_timesteps - 1 if num_inference_steps > 1 else 0.0
        timesteps = timesteps.flip(0)
        if integer:
            timesteps = torch.round(timesteps)
    else:
        raise ValueError(f"timestep_spacing={spacing!r}; choose one of {TIMESTEP_SPACINGS}")
    if timesteps.max() >= num_train_timesteps:
        raise ValueError(
            f"steps_offset={steps_offset} puts the first timestep at {int(timesteps.max())}, beyond the "
            f"schedule's last ({num_train_timesteps - 1}); use fewer steps or steps_offset=0"
        )
    return timesteps.long() if integer else timesteps


def timesteps_for_sigmas(sigmas: Tensor, train_sigmas: Tensor) -> Tensor:
    """Fractional timesteps at which the schedule's sigmas (T,) reach ``sigmas``, interpolating log sigma."""
    log_train = train_sigmas.log()
    log_sigmas = sigmas.clamp(min=1e-10).log()
    low = (torch.searchsorted(log_train, log_sigmas, right=True) - 1).clamp(0, len(train_sigmas) - 2)
    weight = ((log_train[low] - log_sigmas) / (log_train[low] - log_train[low + 1])).clamp(0, 1)
    return low + weight


def _interpolate(timesteps: Tensor, values: Tensor) -> Tensor:
    """``values`` (T,) linearly interpolated at fractional ``timesteps`` in [0, T - 1] (like np.interp)."""
    low = timesteps.floor().long().clamp(0, len(values) - 2)
    weight = timesteps - low
    return values[low] * (1 - weight) + values[low + 1] * weight


def train_sigmas_of(alphas_cumprod: Tensor) -> Tensor:
    """sqrt((1 - a) / a) (T,) in float64, with a zero-terminal-SNR a == 0 replaced as diffusers does."""
    alphas_cumprod = alphas_cumprod.double().where(alphas_cumprod > 0, ZERO_SNR_ALPHA_CUMPROD)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def euler_timesteps_and_sigmas(
    alphas_cumprod: Tensor, num_inference_steps: int, spacing: str, use_karras_sigmas: bool = False, steps_offset: int = 0
) -> tuple[Tensor, Tensor]:
    """Float timesteps (n,) and sigmas (n + 1,) ending at 0, as diffusers' EulerDiscreteScheduler sets them.

    Sigmas are the schedule's sigmas interpolated at the (fractional) timesteps; with Karras sigmas,
    n Karras sigmas between the first and last of those, each with its log-interpolated timestep.
    """
    train_sigmas = train_sigmas_of(alphas_cumprod)
    timesteps = make_timesteps(num_inference_steps, len(train_sigmas), spacing, steps_offset, integer=False)
    sigmas = _interpolate(timesteps, train_sigmas)
    if use_karras_sigmas:
        sigmas = make_karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_inference_steps)
        timesteps = timesteps_for_sigmas(sigmas, train_sigmas)
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])


def dpm_solver_timesteps_and_sigmas(
    alphas_cumprod: Tensor, num_inference_steps: int, spacing: str, use_karras_sigmas: bool = False, steps_offset: int = 0
) -> tuple[Tensor, Tensor]:
    """Integer timesteps (n,) and sigmas (n + 1,) ending at 0, as diffusers' DPMSolverMultistepScheduler sets them.

    ``linspace`` and ``leading`` space n + 1 points and drop the last (t = 0, replaced by sigma 0);
    ``trailing`` is as for the other samplers. Karras sigmas span the whole schedule, and their
    timesteps are rounded to integers (diffusers leaves them fractional for its cosine schedule only).
    """
    train_sigmas = train_sigmas_of(alphas_cumprod)
    num_train_timesteps = len(train_sigmas)
    if use_karras_sigmas:
        sigmas = make_karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), num_inference_steps)
        timesteps = timesteps_for_sigmas(sigmas, train_sigmas).round().long()
    else:
        if spacing == "trailing":
            timesteps = make_timesteps(num_inference_steps, num_train_timesteps, spacing)
        elif num_inference_steps >= num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps}: DPM-Solver with {spacing!r} spacing takes at most "
                f"{num_train_timesteps - 1} steps; use fewer steps or timestep_spacing='trailing'"
            )
        else:
            timesteps = make_timesteps(num_inference_steps + 1, num_train_timesteps, spacing, steps_offset)[:-1]
        sigmas = train_sigmas[timesteps]
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])
