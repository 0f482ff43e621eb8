"""The training loss of any network under any objective: noise levels and noise drawn, x_t built by the objective,
the network's prediction against the objective's target, per-sample weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.conditioning import Conditioning
from ldm.diffusion.losses import LossOptions, debiased_weights, huber_delta, per_sample_loss, perturbed_noise
from ldm.diffusion.objectives import offset_noise
from ldm.diffusion.training_objectives import Objective


def weighted_losses(network: nn.Module, objective: Objective, options: LossOptions, alphas_cumprod: Tensor,
                    latents: Tensor, cond: Conditioning, levels: Tensor, noise: Tensor, input_noise: Tensor,
                    channels_last: bool = False) -> Tensor:
    """Per-sample weighted losses (B,) of ``network(x_t, t, cond)`` at the objective's noise ``levels`` (B,);
    latents, noise and input_noise (B, C, h, w). ``channels_last``: the network's input in that memory order."""
    batch = objective.noised_batch(latents, noise, input_noise, levels, alphas_cumprod)
    model_input = batch.model_input
    if channels_last:
        model_input = model_input.contiguous(memory_format=torch.channels_last)
    prediction = network(model_input, batch.timesteps, cond)
    delta = None
    if options.loss_type != "mse":
        delta = huber_delta(options.huber_schedule, options.huber_delta, batch.snr, batch.noise_fraction)
    per_sample = per_sample_loss(prediction, batch.target, options.loss_type, delta)
    weights = debiased_weights(batch.snr, batch.x0_error_scale) if options.debiased else batch.weights
    return weights * per_sample


def diffusion_loss(network: nn.Module, objective: Objective, options: LossOptions, alphas_cumprod: Tensor,
                   num_train_timesteps: int, latents: Tensor, cond: Conditioning,
                   generator: torch.Generator | None = None, sample_weights: Tensor | None = None,
                   channels_last: bool = False) -> Tensor:
    """The objective's weighted loss at noise levels and noise drawn here (offset noise and input perturbation per
    ``options``): the mean over the batch, or with ``sample_weights`` (B,) the weighted sum."""
    levels = objective.sample_levels(latents.shape[0], num_train_timesteps, generator, latents.device,
                                     options.timestep_bias_range, options.timestep_bias_probability)
    if options.offset_noise_strength > 0:
        noise = offset_noise(latents.shape, options.offset_noise_strength, generator=generator,
                             device=latents.device, dtype=latents.dtype)
    else:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    input_noise = perturbed_noise(noise, options.input_perturbation, generator) if options.input_perturbation else noise
    losses = weighted_losses(network, objective, options, alphas_cumprod, latents, cond, levels, noise, input_noise,
                             channels_last)
    return (losses * sample_weights).sum() if sample_weights is not None else losses.mean()
