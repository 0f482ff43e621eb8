"""The forward process and what the model learns: q_sample, epsilon / v / x0 targets and their
conversions, loss weights, offset noise.

Notation: a = alphas_cumprod[t], x_t = sqrt(a) x0 + sqrt(1 - a) eps. The prediction types use
diffusers' names: ``epsilon`` (eps), ``v_prediction`` (v = sqrt(a) eps - sqrt(1 - a) x0, Salimans &
Ho 2022) and ``sample`` (x0). In the training functions ``t`` is an int64 index (B,) into
``alphas_cumprod`` (T,), which may live on another device than the data (it is moved).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_WEIGHTINGS = ("uniform", "min_snr", "snr_as_epsilon", "snr_as_v_prediction", "snr_as_sample")


def check_prediction_type(prediction_type: str) -> None:
    """Raise a ValueError naming the valid types when ``prediction_type`` is not one of them."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; choose one of {PREDICTION_TYPES}")


def alphas_cumprod_at(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """alphas_cumprod[t] as (B, 1, ..., 1) on ``like``'s device (in alphas_cumprod's dtype), broadcastable to ``like``."""
    values = alphas_cumprod.to(like.device)[t.to(like.device)]
    return values.view((-1,) + (1,) * (like.ndim - 1))


def _sqrt_coefficients(alpha_cumprod: Tensor | float, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """sqrt(a) and sqrt(1 - a), computed in a's precision, then as tensors in ``like``'s dtype."""
    if isinstance(alpha_cumprod, Tensor):
        return alpha_cumprod.sqrt().to(like.dtype), (1 - alpha_cumprod).sqrt().to(like.dtype)
    return math.sqrt(alpha_cumprod), math.sqrt(1 - alpha_cumprod)


def x0_and_eps_from_prediction(
    prediction_type: str, model_output: Tensor, x_t: Tensor, alpha_cumprod: Tensor | float
) -> tuple[Tensor, Tensor]:
    """The x0 and eps that a model output of ``prediction_type`` implies at noise level ``alpha_cumprod``.

    model_output, x_t: (B, ...); alpha_cumprod: a float or a tensor broadcastable to x_t. It need not
    be one of the schedule's values: Euler-type samplers use interpolated noise levels.
    """
    check_prediction_type(prediction_type)
    sqrt_a, sqrt_one_minus_a = _sqrt_coefficients(alpha_cumprod, x_t)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sqrt_one_minus_a * eps) / sqrt_a
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - sqrt_a * x0) / sqrt_one_minus_a
    else:
        x0 = sqrt_a * x_t - sqrt_one_minus_a * model_output
        eps = sqrt_one_minus_a * x_t + sqrt_a * model_output
    return x0, eps


def prediction_from_x0_and_eps(prediction_type: str, x0: Tensor, eps: Tensor, alpha_cumprod: Tensor | float) -> Tensor:
    """What a model of ``prediction_type`` should output for this x0 and eps at noise level ``alpha_cumprod``."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    sqrt_a, sqrt_one_minus_a = _sqrt_coefficients(alpha_cumprod, x0)
    return sqrt_a * eps - sqrt_one_minus_a * x0


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sample x_t ~ q(x_t | x0) = sqrt(a) x0 + sqrt(1 - a) noise. x0, noise: (B, ...); t: (B,) int64."""
    sqrt_a, sqrt_one_minus_a = _sqrt_coefficients(alphas_cumprod_at(alphas_cumprod, t, x0), x0)
    return sqrt_a * x0 + sqrt_one_minus_a * noise


def training_target(prediction_type: str, x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The regression target of ``prediction_type`` for x_t = q_sample(x0, t, noise): noise, v or x0. (B, ...)."""
    check_prediction_type(prediction_type)
    return prediction_from_x0_and_eps(prediction_type, x0, noise, alphas_cumprod_at(alphas_cumprod, t, x0))


def predict_x0_and_eps(
    prediction_type: str, model_output: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor
) -> tuple[Tensor, Tensor]:
    """The model's estimates of x0 and eps from its output of ``prediction_type`` at x_t. t: (B,) int64."""
    return x0_and_eps_from_prediction(prediction_type, model_output, x_t, alphas_cumprod_at(alphas_cumprod, t, x_t))


def convert_prediction(
    model_output: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor, from_type: str, to_type: str
) -> Tensor:
    """Re-express a prediction of ``from_type`` as the equivalent one of ``to_type`` (exact given x_t, t)."""
    check_prediction_type(to_type)
    x0, eps = predict_x0_and_eps(from_type, model_output, x_t, t, alphas_cumprod)
    return prediction_from_x0_and_eps(to_type, x0, eps, alphas_cumprod_at(alphas_cumprod, t, x_t))


# Squared error of each prediction type per unit squared error of x0: |d eps|^2 = SNR |d x0|^2 and
# |d v|^2 = (SNR + 1) |d x0|^2, since x0 = (x_t - sqrt(1-a) eps) / sqrt(a) = sqrt(a) x_t - sqrt(1-a) v.
def x0_error_scale(prediction_type: str, snr: Tensor) -> Tensor:
    """How many times the squared error of ``prediction_type``'s output exceeds the x0 error it implies (B,)."""
    return {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[prediction_type]


def loss_weights(
    weighting: str, t: Tensor, alphas_cumprod: Tensor, prediction_type: str, snr_gamma: float = 5.0
) -> Tensor:
    """Per-sample weights (B,) that multiply the MSE between the model output and its target.

    With SNR = a / (1 - a), an error in x0 costs SNR times more in epsilon and SNR + 1 times more in v,
    so each weighting is first defined on the x0 error and then divided by that factor for
    ``prediction_type``:

    - ``uniform``: 1 (the plain MSE of whatever the model predicts).
    - ``min_snr``: Min-SNR-gamma (Hang et al. 2023): x0 weight min(SNR, snr_gamma), i.e.
      min(SNR, gamma) / SNR for epsilon (1 where SNR is 0), min(SNR, gamma) / (SNR + 1) for v, as
      diffusers' training scripts do.
    - ``snr_as_epsilon`` / ``snr_as_v_prediction`` / ``snr_as_sample``: the weights that make the loss
      equal to the plain MSE of that prediction type, so the three prediction types train the same
      objective: x0 weight SNR, SNR + 1 or 1. E.g. snr_as_epsilon is 1 for epsilon,
      SNR / (SNR + 1) for v and SNR for x0. (snr_as_sample with epsilon is 1 / SNR: infinite where SNR is 0.)
    """
    check_prediction_type(prediction_type)
    a = alphas_cumprod.to(t.device)[t].float()
    snr = a / (1 - a)
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        if prediction_type == "epsilon":  # min(SNR, gamma) / SNR, written so that SNR = 0 gives 1
            return torch.clamp(snr_gamma / snr, max=1.0)
        return torch.clamp(snr, max=snr_gamma) / x0_error_scale(prediction_type, snr)
    if weighting.startswith("snr_as_") and weighting in LOSS_WEIGHTINGS:
        as_type = weighting.removeprefix("snr_as_")
        return x0_error_scale(as_type, snr) / x0_error_scale(prediction_type, snr)
    raise ValueError(f"loss_weighting={weighting!r}; choose one of {LOSS_WEIGHTINGS}")


def offset_noise(
    shape: tuple[int, ...],
    strength: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """N(0, I) noise of ``shape`` (B, C, ...) plus ``strength`` times one N(0, 1) constant per (sample,
    channel) (Guttenberg 2023), so the model also learns to change an image's mean brightness."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    offset = torch.randn(tuple(shape[:2]) + (1,) * (len(shape) - 2), generator=generator, device=device, dtype=dtype)
    return noise + strength * offset
