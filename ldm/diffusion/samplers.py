"""Samplers of the reverse process for discrete-schedule models: DDPM, DDIM, Euler, Euler ancestral, Heun and
DPM-Solver++(2M). ``ldm.diffusion.sampling.sample`` dispatches to these and to the flow-matching
(``flow_matching.py``) and EDM (``edm.py``) samplers; their timestep and sigma grids are ``timesteps.py``'s.

Each sampler is a loop over timesteps around one ``denoise(x, t) -> model output`` callable
(guidance wraps that callable; see ``guidance.py``). The denoiser receives the model-space input
x_t (B, C, H, W) of the variance-preserving process and float timesteps t (B,) in [0, T), and
returns an output of ``prediction_type``; the sampler turns it into x0 / eps itself. ``noise`` is a
standard-normal tensor of the latent shape; samplers return the final x0 estimate (B, C, H, W).
Stochastic samplers draw fresh noise with ``torch.randn(..., generator=generator)`` at each step, in
the order diffusers' schedulers do, so a generator seeded alike gives the same samples as diffusers.

Timesteps, sigmas and step rules follow diffusers 0.42 (``DDPMScheduler``, ``DDIMScheduler``,
``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``, ``DPMSolverMultistepScheduler``
with ``algorithm_type="dpmsolver++", solver_order=2``) at their constructor defaults, except where a
sampler's docstring says otherwise. Deliberate differences: ldm never clips or thresholds x0
(diffusers' DDPM and DDIM default to ``clip_sample=True``, meant for pixels in [-1, 1], not latents);
DDIM always ends at alpha 1 and steps to the next listed timestep (see ``sample_ddim``); no Euler
"churn"; ``timesteps.make_timesteps`` avoids two diffusers edge cases (see there).

Every sampler also takes ``steps_offset`` (added to "leading" timesteps; SD 1.x configs use 1) and
``callback(step_index, x, x0_estimate)``, called after each step (for previews and step-by-step tests).

Euler-type samplers work in the "sigma" parametrisation x = x0 + sigma * eps (x = x_t / sqrt(a),
sigma = sqrt((1 - a) / a)) and feed the model x / sqrt(sigma^2 + 1), which is x_t again.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.karras import sample_karras
from ldm.diffusion.objectives import check_prediction_type, x0_and_eps_from_prediction
from ldm.diffusion.timesteps import dpm_solver_timesteps_and_sigmas, euler_timesteps_and_sigmas, make_timesteps

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor, Tensor], None]  # (step index, x after the step, x0 estimate)


# -------------------------------------------------------------------------------------- helpers
def _schedule(alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """alphas_cumprod as float64 on the CPU, where per-step coefficients are computed as Python floats."""
    check_prediction_type(prediction_type)
    return alphas_cumprod.detach().to("cpu", torch.float64)


def _check_first_step(alphas_cumprod: Tensor, first_timestep: int, prediction_type: str) -> None:
    if prediction_type == "epsilon" and alphas_cumprod[first_timestep] == 0:
        raise ValueError(
            f"alphas_cumprod[{first_timestep}] is 0 (zero terminal SNR): an epsilon prediction cannot give x0 "
            f"there; use a v_prediction model, or timestep_spacing='leading' which starts below the last step"
        )


def _timestep_batch(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


def _fresh_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _initial_sigma(first_sigma: float, spacing: str) -> float:
    # diffusers' init_noise_sigma: for "leading" the first sigma is below the schedule's largest, and
    # sqrt(sigma^2 + 1) = 1 / sqrt(a) makes the start N(0, I) in x_t, as DDIM's; the others use sigma.
    return first_sigma if spacing in ("linspace", "trailing") else math.sqrt(first_sigma**2 + 1)


# ------------------------------------------------------------------------------------- samplers
@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    num_inference_steps: int = 1000,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "leading",
    generator: torch.Generator | None = None,
    steps_offset: int = 0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling from the posterior q(x_prev | x_t, x0) (Ho et al. 2020), diffusers' DDPMScheduler.

    With fewer steps than T the chain is respaced: its betas are 1 - a_t / a_prev between the chosen
    timesteps. Variance "fixed_small" (the posterior's); no noise is added on the last step.
    """
    alphas_cumprod = _schedule(alphas_cumprod, prediction_type)
    timesteps = make_timesteps(num_inference_steps, len(alphas_cumprod), timestep_spacing, steps_offset).tolist()
    _check_first_step(alphas_cumprod, timesteps[0], prediction_type)
    x = noise
    for i, t in enumerate(timesteps):
        a_t = alphas_cumprod[t].item()
        a_prev = alphas_cumprod[timesteps[i + 1]].item() if i + 1 < len(timesteps) else 1.0
        x0, _ = x0_and_eps_from_prediction(prediction_type, denoise(x, _timestep_batch(t, x)), x, a_t)
        alpha_step = a_t / a_prev
        beta_step = 1 - alpha_step
        # Mean of q(x_prev | x_t, x0), Ho et al. 2020 eq. 7, for the (respaced) step from t to prev.
        x0_coefficient = math.sqrt(a_prev) * beta_step / (1 - a_t)
        x_coefficient = math.sqrt(alpha_step) * (1 - a_prev) / (1 - a_t)
        x = x0_coefficient * x0 + x_coefficient * x
        if i + 1 < len(timesteps):
            variance = (1 - a_prev) / (1 - a_t) * beta_step
            x = x + math.sqrt(variance) * _fresh_noise(x, generator)
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    num_inference_steps: int = 50,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "leading",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    steps_offset: int = 0,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021): deterministic for eta = 0, the DDPM posterior's noise level for eta = 1.

    As diffusers' DDIMScheduler with ``set_alpha_to_one=True``: the last step goes to a = 1, so the
    result is the last x0 estimate. Unlike diffusers, each step goes to the next timestep of the list;
    diffusers steps to t - T // n, which is the same for "leading" and "trailing" but, for
    "linspace", a noise level a step or so away from where the next model call is told it is.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta}; DDIM's eta must lie in [0, 1] (0: deterministic, 1: DDPM-like)")
    alphas_cumprod = _schedule(alphas_cumprod, prediction_type)
    timesteps = make_timesteps(num_inference_steps, len(alphas_cumprod), timestep_spacing, steps_offset).tolist()
    _check_first_step(alphas_cumprod, timesteps[0], prediction_type)
    x = noise
    for i, t in enumerate(timesteps):
        a_t = alphas_cumprod[t].item()
        a_prev = alphas_cumprod[timesteps[i + 1]].item() if i + 1 < len(timesteps) else 1.0
        x0, eps = x0_and_eps_from_prediction(prediction_type, denoise(x, _timestep_batch(t, x)), x, a_t)
        # sigma_t of DDIM eq. 16: eta times the std of the DDPM posterior q(x_prev | x_t, x0).
        std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - std**2, 0.0)) * eps
        if std > 0:
            x = x + std * _fresh_noise(x, generator)
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.no_grad()
def sample_euler(
    denoise: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    num_inference_steps: int = 50,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    karras_sigmas: bool = False,
    generator: torch.Generator | None = None,
    steps_offset: int = 0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler steps of the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, Alg. 1
    without churn), as diffusers' EulerDiscreteScheduler with its defaults (s_churn = 0, final sigma 0).

    ``generator`` is unused (the sampler is deterministic); it is accepted so samplers are interchangeable.
    """
    alphas_cumprod = _schedule(alphas_cumprod, prediction_type)
    timesteps, sigmas = euler_timesteps_and_sigmas(
        alphas_cumprod, num_inference_steps, timestep_spacing, karras_sigmas, steps_offset
    )
    sigmas = sigmas.tolist()
    x = noise * _initial_sigma(sigmas[0], timestep_spacing)
    for i, t in enumerate(timesteps.tolist()):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        model_input = x / math.sqrt(sigma**2 + 1)
        model_output = denoise(model_input, _timestep_batch(t, x))
        x0, _ = x0_and_eps_from_prediction(prediction_type, model_output, model_input, 1 / (sigma**2 + 1))
        derivative = (x - x0) / sigma
        x = x + derivative * (sigma_next - sigma)
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoise: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    num_inference_steps: int = 50,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    karras_sigmas: bool = False,
    generator: torch.Generator | None = None,
    steps_offset: int = 0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral, eta = 1), as diffusers'
    EulerAncestralDiscreteScheduler: an Euler step down to sigma_down, then fresh noise of std
    sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2.

    Beyond diffusers, this also takes ``prediction_type="sample"`` and ``karras_sigmas=True``.
    """
    alphas_cumprod = _schedule(alphas_cumprod, prediction_type)
    timesteps, sigmas = euler_timesteps_and_sigmas(
        alphas_cumprod, num_inference_steps, timestep_spacing, karras_sigmas, steps_offset
    )
    sigmas = sigmas.tolist()
    x = noise * _initial_sigma(sigmas[0], timestep_spacing)
    for i, t in enumerate(timesteps.tolist()):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        model_input = x / math.sqrt(sigma**2 + 1)
        model_output = denoise(model_input, _timestep_batch(t, x))
        x0, _ = x0_and_eps_from_prediction(prediction_type, model_output, model_input, 1 / (sigma**2 + 1))
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        derivative = (x - x0) / sigma
        x = x + derivative * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + sigma_up * _fresh_noise(x, generator)
        if callback is not None:
            callback(i, x, x0)
    return x


@torch.no_grad()
def sample_heun(
    denoise: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    num_inference_steps: int = 25,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    karras_sigmas: bool = False,
    generator: torch.Generator | None = None,
    steps_offset: int = 0,
    callback: StepCallback | None = None,
) -> Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 2 without churn) on the schedule's sigmas, as diffusers'
    HeunDiscreteScheduler: sigmas and timesteps as for Euler, 2 n - 1 model calls for n steps.

    The corrector at sigma_next is called with sigma_next's timestep. ``generator`` is unused (deterministic).
    """
    alphas_cumprod = _schedule(alphas_cumprod, prediction_type)
    timesteps, sigmas = euler_timesteps_and_sigmas(
        alphas_cumprod, num_inference_steps, timestep_spacing, karras_sigmas, steps_offset
    )
    timestep_of = dict(zip(sigmas[:-1].tolist(), timesteps.tolist()))  # the corrector reuses the next step's

    def denoised(x: Tensor, sigma: float) -> Tensor:
        t = timestep_of[sigma]
        model_input = x / math.sqrt(sigma**2 + 1)
        model_output = denoise(model_input, _timestep_batch(t, x))
        return x0_and_eps_from_prediction(prediction_type, model_output, model_input, 1 / (sigma**2 + 1))[0]

    x = noise * _initial_sigma(sigmas[0].item(), timestep_spacing)
    return sample_karras(denoised, x, sigmas, callback=callback)


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    num_inference_steps: int = 20,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "linspace",
    karras_sigmas: bool = False,
    generator: torch.Generator | None = None,
    steps_offset: int = 0,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with
    ``algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"`` and its defaults
    (``lower_order_final=True``, ``final_sigmas_type="zero"``).

    Works on x_t (VP) with alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha and
    lambda = log(alpha / sigma_t) = -log(sigma). The first step is first order (no earlier x0 yet);
    the last step, to sigma 0, lands on the x0 estimate. ``generator`` is unused (deterministic).
    """
    alphas_cumprod = _schedule(alphas_cumprod, prediction_type)
    timesteps, sigmas = dpm_solver_timesteps_and_sigmas(
        alphas_cumprod, num_inference_steps, timestep_spacing, karras_sigmas, steps_offset
    )
    sigmas = sigmas.tolist()
    x = noise
    previous_x0, previous_h = None, None
    for i, t in enumerate(timesteps.tolist()):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        model_output = denoise(x, _timestep_batch(t, x))
        x0, _ = x0_and_eps_from_prediction(prediction_type, model_output, x, 1 / (sigma**2 + 1))
        if sigma_next == 0:
            x = x0  # the first-order step to sigma 0, exactly
        else:
            h = math.log(sigma) - math.log(sigma_next)  # lambda_next - lambda
            alpha_next = 1 / math.sqrt(sigma_next**2 + 1)
            sigma_t_ratio = (sigma_next * alpha_next) / (sigma / math.sqrt(sigma**2 + 1))
            if previous_x0 is None:
                x0_estimate = x0
            else:  # midpoint rule with the slope of x0 over lambda from the last two steps
                r = previous_h / h
                x0_estimate = x0 + (x0 - previous_x0) / (2 * r)
            x = sigma_t_ratio * x - alpha_next * math.expm1(-h) * x0_estimate
            previous_h = h
        previous_x0 = x0
        if callback is not None:
            callback(i, x, x0)
    return x
