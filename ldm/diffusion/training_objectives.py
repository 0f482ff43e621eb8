"""What a training step computes for each objective: noise levels, the network's input and timestep, the
regression target and the per-sample weight. Built by Hydra as ``model.objective`` (flow matching, EDM);
discrete diffusion (epsilon / v / x0 on a NoiseSchedule) is the default ``model/objective=discrete``.

Every objective exposes, per sample, the SNR of its noise level, a noise fraction in [0, 1] and the
factor by which its target's squared error exceeds the x0 error (``x0_error_scale``), so that the loss
options of ``losses.py`` (debiased weighting, scheduled Huber delta) mean the same thing for each.
``prediction_type`` names the objective to the samplers and in checkpoints: epsilon | v_prediction |
sample (discrete), flow, edm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.edm import (
    edm_loss_weight,
    edm_model_input,
    edm_preconditioning,
    edm_sigmas_from_quantiles,
    edm_training_target,
)
from ldm.diffusion.flow_matching import (
    FLOW_TIMESTEP_SAMPLINGS,
    flow_interpolate,
    flow_timesteps_from_quantiles,
    flow_velocity_target,
    shift_timesteps,
)
from ldm.diffusion.objectives import (
    LOSS_WEIGHTINGS,
    check_prediction_type,
    loss_weights,
    q_sample,
    training_target,
    x0_error_scale,
)
from ldm.diffusion.timestep_sampling import discrete_timesteps_from_quantiles, sample_quantiles


@dataclass
class NoisedBatch:
    """One training step's inputs and targets. Tensors of the latents' shape are (B, C, H, W); the rest (B,)."""

    model_input: Tensor
    timesteps: Tensor  # what the network is told: int64 for discrete diffusion, float32 otherwise
    target: Tensor
    weights: Tensor  # the objective's own weighting of the target's squared error
    snr: Tensor
    noise_fraction: Tensor
    x0_error_scale: Tensor


class DiscreteDiffusion:
    """Variance-preserving diffusion on a discrete NoiseSchedule, predicting eps, v or x0 (today's default).

    ``loss_weighting`` and ``snr_gamma``: see ``objectives.loss_weights``.
    """

    family = "discrete"
    default_sampler = "ddim"

    def __init__(self, prediction_type: str = "epsilon", loss_weighting: str = "uniform", snr_gamma: float = 5.0):
        check_prediction_type(prediction_type)
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"model.objective.loss_weighting={loss_weighting!r}; choose one of {LOSS_WEIGHTINGS}")
        if isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float)) or not snr_gamma > 0 \
                or snr_gamma == float("inf"):
            raise ValueError(f"model.objective.snr_gamma={snr_gamma!r} must be a finite number > 0 (5 in Hang et al.)")
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.snr_gamma = snr_gamma

    def sample_levels(self, batch_size: int, num_train_timesteps: int, generator: torch.Generator | None,
                      device: torch.device, bias_range: tuple[float, float] | None, bias_probability: float) -> Tensor:
        """Timesteps (B,) int64, uniform in [0, T) (drawn as before the objectives existed when unbiased)."""
        if bias_range is None or bias_probability == 0:
            return torch.randint(0, num_train_timesteps, (batch_size,), device=device, generator=generator)
        u = sample_quantiles(batch_size, generator, device, bias_range, bias_probability)
        return discrete_timesteps_from_quantiles(u, num_train_timesteps)

    def levels_from_quantiles(self, u: Tensor, num_train_timesteps: int) -> Tensor:
        """Timesteps (B,) int64 at quantiles u (B,) of the training distribution (floor(u T))."""
        return discrete_timesteps_from_quantiles(u, num_train_timesteps)

    def noised_batch(self, x0: Tensor, noise: Tensor, input_noise: Tensor, levels: Tensor,
                     alphas_cumprod: Tensor) -> NoisedBatch:
        """x_t = q_sample(x0, t, input_noise); the target uses ``noise`` (they differ under input perturbation)."""
        a = alphas_cumprod.to(levels.device)[levels].float()
        snr = a / (1 - a)
        return NoisedBatch(
            model_input=q_sample(x0, levels, input_noise, alphas_cumprod),
            timesteps=levels,
            target=training_target(self.prediction_type, x0, noise, levels, alphas_cumprod),
            weights=loss_weights(self.loss_weighting, levels, alphas_cumprod, self.prediction_type, self.snr_gamma),
            snr=snr,
            noise_fraction=levels.float() / len(alphas_cumprod),
            x0_error_scale=x0_error_scale(self.prediction_type, snr),
        )

    def sampler_options(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"DiscreteDiffusion(prediction_type={self.prediction_type!r}, loss_weighting={self.loss_weighting!r})"


class FlowMatching:
    """Rectified flow (``flow_matching.py``): the network predicts the velocity noise - x0 at time t, told
    t * num_train_timesteps. Times: ``timestep_sampling`` uniform | logit_normal (``logit_mean``,
    ``logit_std``; SD 3: 0, 1) | mode (``mode_scale``; SD 3: 1.29), then shifted by ``shift`` (1: none),
    in training and sampling alike. Weighting: none (uniform on the velocity), as SD 3.
    """

    family = "flow"
    prediction_type = "flow"
    default_sampler = "flow_euler"

    def __init__(self, timestep_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, shift: float = 1.0) -> None:
        if timestep_sampling not in FLOW_TIMESTEP_SAMPLINGS:
            raise ValueError(f"model.objective.timestep_sampling={timestep_sampling!r}; "
                             f"choose one of {FLOW_TIMESTEP_SAMPLINGS}")
        if logit_std <= 0:
            raise ValueError(f"model.objective.logit_std={logit_std}; it must be positive (SD 3: 1.0)")
        if shift <= 0:
            raise ValueError(f"model.objective.shift={shift}; it must be positive (1: no shift; SD 3: 3.0 at 1024 px)")
        self.timestep_sampling = timestep_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale
        self.shift = shift

    def sample_levels(self, batch_size: int, num_train_timesteps: int, generator: torch.Generator | None,
                      device: torch.device, bias_range: tuple[float, float] | None, bias_probability: float) -> Tensor:
        """Times t (B,) float32 in (0, 1)."""
        u = sample_quantiles(batch_size, generator, device, bias_range, bias_probability)
        return self.levels_from_quantiles(u, num_train_timesteps)

    def levels_from_quantiles(self, u: Tensor, num_train_timesteps: int) -> Tensor:
        """Times t (B,) float32 at quantiles u (B,) of the training distribution (sampling, then shift)."""
        t = flow_timesteps_from_quantiles(u, self.timestep_sampling, self.logit_mean, self.logit_std, self.mode_scale)
        return shift_timesteps(t, self.shift) if self.shift != 1.0 else t

    def noised_batch(self, x0: Tensor, noise: Tensor, input_noise: Tensor, levels: Tensor,
                     alphas_cumprod: Tensor) -> NoisedBatch:
        """x_t = (1 - t) x0 + t input_noise; target noise - x0; the schedule's alphas_cumprod is unused."""
        t = levels.float()
        return NoisedBatch(
            model_input=flow_interpolate(x0, input_noise, t),
            timesteps=t * len(alphas_cumprod),
            target=flow_velocity_target(x0, noise),
            weights=torch.ones_like(t),
            snr=((1 - t) / t) ** 2,
            noise_fraction=t,
            x0_error_scale=1 / t**2,  # x0 = x_t - t v, so |d v|^2 = |d x0|^2 / t^2
        )

    def sampler_options(self) -> dict:
        return {"shift": self.shift}

    def __repr__(self) -> str:
        return f"FlowMatching(timestep_sampling={self.timestep_sampling!r}, shift={self.shift})"


class EDM:
    """EDM preconditioning (``edm.py``): the network F sees c_in x and c_noise = ln(sigma) / 4; ln(sigma) ~
    N(p_mean, p_std^2) in training; the error of D = c_skip x + c_out F is weighted by lambda(sigma).

    ``sigma_data`` is the data's std: 1.0 for ldm's latents, which latent_scale_factor scales to unit
    variance (the paper's 0.5 is for pixels in [-1, 1]). ``sigma_min``, ``sigma_max``, ``rho``: the
    sampler's Karras sigmas (paper: 0.002, 80, 7).
    """

    family = "edm"
    prediction_type = "edm"
    default_sampler = "edm_heun"

    def __init__(self, sigma_data: float = 1.0, p_mean: float = -1.2, p_std: float = 1.2, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0) -> None:
        if sigma_data <= 0 or p_std <= 0:
            raise ValueError(f"model.objective.sigma_data={sigma_data}, p_std={p_std}; both must be positive")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"model.objective.sigma_min={sigma_min}, sigma_max={sigma_max}; need 0 < min < max")
        self.sigma_data = sigma_data
        self.p_mean = p_mean
        self.p_std = p_std
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho

    def sample_levels(self, batch_size: int, num_train_timesteps: int, generator: torch.Generator | None,
                      device: torch.device, bias_range: tuple[float, float] | None, bias_probability: float) -> Tensor:
        """Noise levels sigma (B,) float32, log-normal."""
        u = sample_quantiles(batch_size, generator, device, bias_range, bias_probability)
        return self.levels_from_quantiles(u, num_train_timesteps)

    def levels_from_quantiles(self, u: Tensor, num_train_timesteps: int) -> Tensor:
        """Noise levels sigma (B,) float32 at quantiles u (B,) of the training log-normal."""
        return edm_sigmas_from_quantiles(u, self.p_mean, self.p_std)

    def noised_batch(self, x0: Tensor, noise: Tensor, input_noise: Tensor, levels: Tensor,
                     alphas_cumprod: Tensor) -> NoisedBatch:
        """x = x0 + sigma input_noise; network input c_in x, c_noise; target F; the schedule is unused."""
        sigma = levels.double()
        per_sample = sigma.to(x0.dtype).view((-1,) + (1,) * (x0.ndim - 1))
        model_input, c_noise = edm_model_input(x0 + per_sample * input_noise, sigma, self.sigma_data)
        _, c_out, _, _ = edm_preconditioning(sigma, self.sigma_data)
        error_scale = (1 / c_out**2).float()  # D = c_skip x + c_out F
        return NoisedBatch(
            model_input=model_input,
            timesteps=c_noise,
            target=edm_training_target(x0, noise, sigma, self.sigma_data),
            weights=edm_loss_weight(sigma, self.sigma_data).float() / error_scale,  # lambda c_out^2 = 1
            snr=(1 / sigma**2).float(),
            noise_fraction=(sigma / (1 + sigma)).float(),
            x0_error_scale=error_scale,
        )

    def sampler_options(self) -> dict:
        return {"sigma_data": self.sigma_data, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "rho": self.rho}

    def __repr__(self) -> str:
        return f"EDM(sigma_data={self.sigma_data}, p_mean={self.p_mean}, p_std={self.p_std})"


Objective = DiscreteDiffusion | FlowMatching | EDM


def check_objective_configuration(objective: Objective, zero_terminal_snr: bool) -> None:
    """Refuse, at start-up and naming the key, a noise-schedule setting that belongs to another objective."""
    if objective.family != "discrete" and zero_terminal_snr:
        raise ValueError(
            f"model.noise_schedule.zero_terminal_snr=true is a discrete-diffusion setting; model.objective "
            f"({objective.prediction_type}) has its own noise levels: set zero_terminal_snr=false"
        )


__all__ = ["EDM", "DiscreteDiffusion", "FlowMatching", "NoisedBatch", "Objective", "check_objective_configuration"]
