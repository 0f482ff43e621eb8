"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper of the denoiser that samplers call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.conditioning import Conditioning, concatenate
from ldm.diffusion.samplers import Denoiser


def rescale_guided(guided: Tensor, conditional: Tensor, guidance_rescale: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, eqs. 15-16): scale the guided output so its per-sample std
    matches the conditional output's, then blend with the unscaled output by ``guidance_rescale`` (phi).

    guided, conditional: (B, ...); the std is over all dims but the batch, as diffusers' rescale_noise_cfg.
    """
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def classifier_free_guidance(
    network: Callable[[Tensor, Tensor, Conditioning], Tensor],
    cond: Conditioning,
    uncond: Conditioning,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
) -> Denoiser:
    """A denoiser (x, t) -> uncond + guidance_scale * (cond - uncond), rescaled when guidance_rescale > 0.

    ``network(x, t, cond)``: x (B, C, H, W), t (B,), a ``Conditioning`` of batch B. ``uncond`` (batch 1 or B) is
    the empty/negative prompt's conditioning, broadcast to B. Each call runs ONE forward pass over the batch
    [uncond; cond] (2B), or only the conditional B when guidance_scale == 1 (the guided output is then the
    conditional one). The combination is applied to whatever the network predicts (eps, v, velocity).
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale={guidance_rescale}; it must lie in [0, 1] (0.7 in Lin et al. 2023)")
    batch_size = cond.batch_size
    if uncond.batch_size not in (1, batch_size):
        raise ValueError(
            f"the unconditional conditioning has batch {uncond.batch_size} but the conditional one has "
            f"{batch_size}; give one unconditional conditioning (batch 1) or one per prompt"
        )
    both = concatenate([uncond.expand(batch_size), cond])

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        if guidance_scale == 1.0:
            return network(x, t, cond)
        uncond_output, cond_output = network(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        guided = uncond_output + guidance_scale * (cond_output - uncond_output)
        return rescale_guided(guided, cond_output, guidance_rescale) if guidance_rescale > 0 else guided

    return denoise
