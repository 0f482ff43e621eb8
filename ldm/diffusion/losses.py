"""Loss options that apply to any objective: input perturbation, Huber and pseudo-Huber losses with a
constant or noise-level-scheduled delta, and debiased-estimation weighting.

Objectives describe a noise level by its signal-to-noise ratio SNR = 1 / sigma^2 in the sigma
parametrisation x / scale = x0 + sigma eps (discrete: sigma^2 = (1 - a) / a; flow: sigma = t / (1 - t);
EDM: sigma), and by how much their regression target's squared error costs per unit squared error of
x0 (``x0_error_scale``), so a weighting defined on x0 carries over to each of them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.timestep_sampling import check_timestep_bias

LOSS_TYPES = ("mse", "huber", "pseudo_huber")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# kohya's sd-scripts clamp the SNR at 1000 for debiased estimation; at SNR -> infinity (sigma -> 0) the
# weight would otherwise grow without bound for x0-space objectives.
DEBIASED_MAX_SNR = 1000.0


def perturbed_noise(noise: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Input perturbation (Ning et al. 2023): noise + strength * xi (B, ...), xi ~ N(0, I), used to build
    the model's input only; the target keeps the unperturbed noise, so the model learns to correct the
    small mismatch between training inputs and its own sampling trajectory (paper: strength 0.1)."""
    fresh = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + strength * fresh


def huber_delta(
    schedule: str, delta: float, snr: Tensor, noise_fraction: Tensor
) -> Tensor:
    """Per-sample Huber delta (B,) (Khrapov et al. 2024, scheduled pseudo-Huber):

    - ``constant``: delta.
    - ``exponential``: delta ** nu with nu in [0, 1] the noise fraction (t / T, flow t, EDM sigma / (1 + sigma)):
      1 (nearly MSE) at clean inputs, delta at pure noise.
    - ``snr``: (1 - delta) / (1 + sigma)^2 + delta with sigma = 1 / sqrt(SNR): 1 at sigma 0, -> delta as sigma grows.
    snr, noise_fraction: (B,).
    """
    if delta <= 0:
        raise ValueError(f"huber_delta={delta}; it must be positive")
    if schedule == "constant":
        return torch.full_like(snr, delta)
    if schedule == "exponential":
        return torch.exp(math.log(delta) * noise_fraction)
    if schedule == "snr":
        sigma = snr.clamp(min=1e-20).rsqrt()
        return (1 - delta) / (1 + sigma) ** 2 + delta
    raise ValueError(f"huber_schedule={schedule!r}; choose one of {HUBER_SCHEDULES}")


def per_sample_loss(prediction: Tensor, target: Tensor, loss_type: str = "mse", delta: Tensor | None = None) -> Tensor:
    """The mean over all but the batch dim (B,) of an elementwise loss of the residual r = prediction - target:

    - ``mse``: r^2;
    - ``huber``: r^2 for |r| <= delta, else 2 delta |r| - delta^2 (twice torch's Huber, so it is r^2 near 0);
    - ``pseudo_huber``: 2 delta (sqrt(r^2 + delta^2) - delta), smooth, r^2 near 0 and 2 delta |r| far away.
    Computed in float32 or wider. delta: (B,), needed for the Huber losses.
    """
    residual = prediction.float() - target.float()
    dims = tuple(range(1, residual.ndim))
    if loss_type == "mse":
        return residual.pow(2).mean(dim=dims)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; choose one of {LOSS_TYPES}")
    if delta is None:
        raise ValueError(f"loss_type={loss_type!r} needs a delta per sample")
    delta = delta.to(residual.device, residual.dtype).view((-1,) + (1,) * (residual.ndim - 1))
    if loss_type == "huber":
        absolute = residual.abs()
        elementwise = torch.where(absolute <= delta, residual.pow(2), 2 * delta * absolute - delta.pow(2))
    else:
        # 2 delta (sqrt(r^2 + delta^2) - delta) written without the subtraction, which loses the small
        # residuals' value to cancellation in float32 (r = delta / 100 came out 0.1% off)
        squared = residual.pow(2)
        elementwise = 2 * delta * squared / ((squared + delta.pow(2)).sqrt() + delta)
    return elementwise.mean(dim=dims)


def debiased_weights(snr: Tensor, x0_error_scale: Tensor) -> Tensor:
    """Debiased estimation (Yu et al. 2024): weight the epsilon error by 1 / sqrt(SNR), i.e. the x0 error
    by sqrt(SNR); divided by ``x0_error_scale`` for an objective whose target is not x0. (B,) -> (B,).
    The SNR is clamped at DEBIASED_MAX_SNR as kohya's sd-scripts do."""
    return snr.clamp(max=DEBIASED_MAX_SNR).sqrt() / x0_error_scale


class LossOptions:
    """The loss options of a training run, built by Hydra (``model.loss``), for any objective.

    ``loss_type``: mse | huber | pseudo_huber, with ``huber_delta`` and ``huber_schedule`` (see
    ``huber_delta``); ``input_perturbation``: Ning et al.'s strength (0: off); ``debiased``: replace the
    objective's own weighting by debiased estimation; ``timestep_bias_range`` ([begin, end] quantiles) and
    ``timestep_bias_probability``: sample more of that part of the noise-level distribution.
    ``offset_noise_strength``: offset noise (``objectives.offset_noise``; 0: plain Gaussian noise).
    ``prior_loss_weight``: DreamBooth's weight of the class images' loss, for batches that mark them (``is_prior``,
    from ``ldm.data.dreambooth.DreamBoothDataModule``; ``prior_preservation.py``).
    """

    def __init__(
        self,
        loss_type: str = "mse",
        huber_delta: float = 0.1,
        huber_schedule: str = "constant",
        input_perturbation: float = 0.0,
        debiased: bool = False,
        timestep_bias_range: tuple[float, float] | None = None,
        timestep_bias_probability: float = 0.0,
        offset_noise_strength: float = 0.0,
        prior_loss_weight: float = 1.0,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"model.loss.loss_type={loss_type!r}; choose one of {LOSS_TYPES}")
        if huber_schedule not in HUBER_SCHEDULES:
            raise ValueError(f"model.loss.huber_schedule={huber_schedule!r}; choose one of {HUBER_SCHEDULES}")
        if huber_delta <= 0:
            raise ValueError(f"model.loss.huber_delta={huber_delta}; it must be positive")
        if input_perturbation < 0:
            raise ValueError(f"model.loss.input_perturbation={input_perturbation}; it must be >= 0 (0.1 in Ning et al.)")
        if timestep_bias_range is not None:
            if len(timestep_bias_range) != 2:
                raise ValueError(f"model.loss.timestep_bias_range={timestep_bias_range}; give [begin, end]")
            begin, end = (float(v) for v in timestep_bias_range)
            check_timestep_bias(begin, end, timestep_bias_probability)
            timestep_bias_range = (begin, end)
        self.loss_type = loss_type
        self.huber_delta = float(huber_delta)
        self.huber_schedule = huber_schedule
        self.input_perturbation = float(input_perturbation)
        self.debiased = bool(debiased)
        self.timestep_bias_range = timestep_bias_range
        self.timestep_bias_probability = float(timestep_bias_probability)
        for name, value in (("offset_noise_strength", offset_noise_strength), ("prior_loss_weight", prior_loss_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"model.loss.{name}={value!r} must be a finite number >= 0")
        self.offset_noise_strength = float(offset_noise_strength)
        self.prior_loss_weight = float(prior_loss_weight)

    def __repr__(self) -> str:
        return f"LossOptions({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"
