"""Rectified flow (flow matching), the objective of SD 3 and Flux: the math and its ODE samplers.

The forward path is a straight line from data to noise, x_t = (1 - t) x0 + t eps for t in [0, 1], and
the model predicts its velocity v = dx_t/dt = eps - x0 (Liu et al. 2022; Lipman et al. 2022; Esser
et al. 2024). The model is called with the timestep ``t * num_train_timesteps`` (1000 by default), as
diffusers' ``FlowMatchEulerDiscreteScheduler`` feeds it, so a U-Net keeps its usual timestep range.

Training times come from a uniform quantile u in [0, 1] (see ``timestep_sampling.py``), mapped by
``flow_timesteps_from_quantiles`` to uniform, logit-normal or "mode" times, then optionally shifted.
The samplers' steps (times, the shift) follow diffusers 0.42's ``FlowMatchEulerDiscreteScheduler``
and ``FlowMatchHeunDiscreteScheduler``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor, Tensor], None]
FLOW_TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """t (B,) as (B, 1, ..., 1) in ``like``'s dtype and device."""
    return t.to(like.device, like.dtype).view((-1,) + (1,) * (like.ndim - 1))


def flow_interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t noise. x0, noise: (B, ...); t: (B,) float in [0, 1]."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def flow_velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target of flow matching, v = noise - x0 (B, ...), the same at every t."""
    return noise - x0


def x0_and_noise_from_velocity(velocity: Tensor, x_t: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """The x0 and noise that a velocity (B, ...) implies at x_t, t: x0 = x_t - t v, noise = x_t + (1 - t) v.

    t: a float or (B,). Exact inverses of ``flow_interpolate`` and ``flow_velocity_target``.
    """
    t = _per_sample(t, x_t) if isinstance(t, Tensor) else t
    return x_t - t * velocity, x_t + (1 - t) * velocity


def velocity_from_x0(x0: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """The velocity (x_t - x0) / t (B, ...) of the straight path through x_t that ends at x0; t > 0."""
    t = _per_sample(t, x_t) if isinstance(t, Tensor) else t
    return (x_t - x0) / t


def flow_time_to_sigma(t: Tensor | float) -> Tensor | float:
    """The EDM / variance-exploding noise level of flow time t: x_t / (1 - t) = x0 + sigma eps, sigma = t / (1 - t)."""
    return t / (1 - t)


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Shift times towards noise, t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024, eq. 23). t: any shape.

    A shift s keeps the same signal-to-noise ratio at s^2 times the pixels: SD 3 trains at 1024 px with
    shift 3; ``resolution_shift`` gives the factor for a change of resolution.
    """
    if shift <= 0:
        raise ValueError(f"shift={shift}; the time shift must be positive (1: none; SD 3 uses 3.0 at 1024 px)")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_pixels: int, base_num_pixels: int) -> float:
    """sqrt(m / n): the shift that gives images of m pixels the noise levels of images of n pixels (SD 3, eq. 23)."""
    return math.sqrt(num_pixels / base_num_pixels)


def flow_timesteps_from_quantiles(
    u: Tensor, sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29
) -> Tensor:
    """Training times t (B,) in [0, 1] from uniform quantiles u (B,) (Esser et al. 2024, section 3.1).

    - ``uniform``: t = u.
    - ``logit_normal``: t = sigmoid(logit_mean + logit_std * Phi^-1(u)), i.e. logit(t) ~ N(mean, std^2);
      SD 3's default is mean 0, std 1, which favours the middle times.
    - ``mode``: t = 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u), a density with heavier tails than the
      logit-normal; mode_scale in [-1, 2 / (pi - 2)] keeps it monotone (SD 3 tried 1.29).
    Written as maps of quantiles so that the timestep bias (``timestep_sampling.py``) works alike for all.
    """
    if sampling == "uniform":
        return u
    if sampling == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(u))
    if sampling == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"timestep_sampling={sampling!r}; choose one of {FLOW_TIMESTEP_SAMPLINGS}")


def flow_sampling_times(num_inference_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """Sampling times (n + 1,) float64 from 1 down to 0, as FlowMatchEulerDiscreteScheduler sets them.

    n times evenly spaced from 1 to the scheduler's smallest training time, shift(1 / T), are shifted
    (so the last is shifted twice, as in diffusers), then 0 is appended.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps}; it must be at least 1")
    smallest = shift_timesteps(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift).item()
    times = shift_timesteps(torch.linspace(1.0, smallest, num_inference_steps, dtype=torch.float64), shift)
    return torch.cat([times, times.new_zeros(1)])


def _times_batch(t: float, x: Tensor, num_train_timesteps: int) -> Tensor:
    return torch.full((x.shape[0],), t * num_train_timesteps, device=x.device, dtype=torch.float32)


@torch.no_grad()
def sample_flow_euler(
    denoise: Denoiser,
    noise: Tensor,
    num_inference_steps: int = 50,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler steps of dx/dt = v(x, t) from x_1 = noise (B, C, H, W) down to t = 0; returns x_0.

    ``denoise(x, t * num_train_timesteps)`` returns the velocity. One model call per step.
    """
    times = flow_sampling_times(num_inference_steps, shift, num_train_timesteps).tolist()
    x = noise
    for i in range(num_inference_steps):
        t, t_next = times[i], times[i + 1]
        velocity = denoise(x, _times_batch(t, x, num_train_timesteps))
        x = x + (t_next - t) * velocity
        if callback is not None:
            callback(i, x, x0_and_noise_from_velocity(velocity, x, t_next)[0])
    return x


@torch.no_grad()
def sample_flow_heun(
    denoise: Denoiser,
    noise: Tensor,
    num_inference_steps: int = 25,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    callback: StepCallback | None = None,
) -> Tensor:
    """Heun's second-order method for dx/dt = v(x, t), as FlowMatchHeunDiscreteScheduler: an Euler step,
    then the average of the velocities at both ends; the last step (to t = 0) stays Euler.
    2 n - 1 model calls for n steps.
    """
    times = flow_sampling_times(num_inference_steps, shift, num_train_timesteps).tolist()
    x = noise
    for i in range(num_inference_steps):
        t, t_next = times[i], times[i + 1]
        velocity = denoise(x, _times_batch(t, x, num_train_timesteps))
        x_euler = x + (t_next - t) * velocity
        if t_next > 0:
            velocity_next = denoise(x_euler, _times_batch(t_next, x, num_train_timesteps))
            velocity = (velocity + velocity_next) / 2
            x = x + (t_next - t) * velocity
        else:
            x = x_euler
        if callback is not None:
            callback(i, x, x0_and_noise_from_velocity(velocity, x, t_next)[0])
    return x
