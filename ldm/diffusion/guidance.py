"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper of the denoiser that samplers call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

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
    model: Callable[[Tensor, Tensor, Tensor], Tensor],
    context: Tensor,
    uncond_context: Tensor,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    vector: Tensor | None = None,
    uncond_vector: Tensor | None = None,
) -> Denoiser:
    """A denoiser (x, t) -> uncond + guidance_scale * (cond - uncond), rescaled when guidance_rescale > 0.

    ``model(x, t, context)``: x (B, C, H, W), t (B,), context (B, L, D). ``uncond_context`` (1 or B, L, D)
    is the empty/negative prompt's context, broadcast to B. Each call runs ONE forward pass over the
    batch [uncond; cond] (2B), or only the conditional B when guidance_scale == 1 (the guided output is
    then the conditional one). The combination is applied to whatever the model predicts (eps or v).
    ``vector`` (B, V) and ``uncond_vector`` (1 or B, V): the U-Net's extra vector y of each branch (SDXL's
    pooled text and size embeddings), passed as ``model(x, t, context, y)`` when given.
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale={guidance_rescale}; it must lie in [0, 1] (0.7 in Lin et al. 2023)")
    batch_size = context.shape[0]
    if uncond_context.shape[0] not in (1, batch_size):
        raise ValueError(
            f"uncond_context has batch {uncond_context.shape[0]} but context has {batch_size}; "
            f"give one unconditional context (batch 1) or one per prompt"
        )
    uncond_context = uncond_context.expand(batch_size, *uncond_context.shape[1:])
    both_contexts = torch.cat([uncond_context, context])
    extra: tuple[Tensor, ...] = ()
    if (vector is None) != (uncond_vector is None):
        raise ValueError("give both vector and uncond_vector (the conditional and unconditional y) or neither")
    if vector is not None:
        both_vectors = torch.cat([uncond_vector.expand(batch_size, *uncond_vector.shape[1:]), vector])
        extra = (both_vectors,)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        if guidance_scale == 1.0:
            return model(x, t, context, *((vector,) if vector is not None else ()))
        uncond, cond = model(torch.cat([x, x]), torch.cat([t, t]), both_contexts, *extra).chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        return rescale_guided(guided, cond, guidance_rescale) if guidance_rescale > 0 else guided

    return denoise
