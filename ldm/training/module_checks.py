"""Start-up checks of a LatentDiffusion run: the optimizer's numbers, the parts against each other, the data's sizes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ldm.config_check import check_number
from ldm.models.conditioner import vector_width


def check_optimizer_arguments(optimizer: Callable[..., torch.optim.Optimizer]) -> None:
    """Check the numbers bound into the optimizer partial (``model.optimizer``) before torch sees them:
    ``lr`` finite and > 0; ``weight_decay``, ``eps``, ``momentum`` finite and >= 0; ``betas`` in [0, 1)."""
    keywords = getattr(optimizer, "keywords", None) or {}
    if "lr" in keywords:
        check_number("model.optimizer.lr", keywords["lr"], minimum=0.0, strict_minimum=True)
    for name in ("weight_decay", "eps", "momentum"):
        if name in keywords:
            check_number(f"model.optimizer.{name}", keywords[name], minimum=0.0)
    if "betas" in keywords:
        betas = keywords["betas"]
        if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
            raise ValueError(f"model.optimizer.betas={betas!r} must be two numbers, e.g. [0.9, 0.999]")
        for index, beta in enumerate(betas):
            check_number(f"model.optimizer.betas[{index}]", beta, minimum=0.0)
            if beta >= 1:
                raise ValueError(f"model.optimizer.betas[{index}]={beta} must be < 1")


def check_model_compatibility(network: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> None:
    """Catch at start-up the mismatches that would otherwise fail deep inside the first step."""
    network_in = getattr(network, "in_channels", None)
    vae_latent = getattr(vae, "embed_dim", None)
    if network_in is not None and vae_latent is not None and network_in != vae_latent:
        raise ValueError(
            f"model.network.in_channels={network_in} but the VAE has {vae_latent} latent channels; "
            f"set model.network.in_channels={vae_latent} (and out_channels) or choose another VAE"
        )
    context_dim = getattr(network, "context_dim", None)
    text_dim = getattr(text_encoder, "output_dim", None)
    if context_dim is not None and text_dim is not None and context_dim != text_dim:
        towers = getattr(text_encoder, "output_dims", None)
        source = f"the text towers output {' + '.join(map(str, towers))} = {text_dim}" if towers else \
            f"the text encoder outputs {text_dim}"
        raise ValueError(
            f"model.network.context_dim={context_dim} but {source}-dim tokens; "
            f"set model.network.context_dim={text_dim} or choose another text_encoder"
        )
    adm_in_channels = getattr(network, "adm_in_channels", None)
    vector_dim = vector_width(text_encoder)
    if (adm_in_channels or 0) != vector_dim:
        if vector_dim:
            parts = (f"{text_encoder.pooled_dim} pooled + {len(text_encoder.size_conditions)} x 2 x "
                     f"{text_encoder.size_embedding_dim} size embeddings")
            given = f"the text encoder's vector is {vector_dim}-dim ({parts})"
        else:
            given = "the text encoder gives no vector (a single tower without micro-conditioning)"
        raise ValueError(f"model.network.adm_in_channels={adm_in_channels} but {given}; set "
                         f"model.network.adm_in_channels={vector_dim or 'null'} or choose another text_encoder")


def check_size_fields(text_encoder: nn.Module, datamodule: Any) -> None:
    """Micro-conditioning needs batches that carry the size fields: those of a data module with buckets
    (``data.buckets``, null for square images: ``ldm.data.datamodule``), which every batch gives them."""
    conditions = list(getattr(text_encoder, "size_conditions", ()))
    if conditions and datamodule is not None and not hasattr(datamodule, "buckets"):
        raise ValueError(f"model.text_encoder.size_conditions={conditions} (micro-conditioning) needs batches with "
                         f"those size fields, which {type(datamodule).__name__} does not give: use a data module "
                         f"with data.buckets (null for square images) or set model.text_encoder.size_conditions=[]")


def check_resolution(resolution: int, vae: nn.Module, network: nn.Module, key: str | None = None) -> None:
    """Images of ``resolution`` px (a side) must give latents that the VAE and the network both divide evenly.
    ``key``: what the error names (default ``data.resolution=<resolution>``), e.g. a bucket of ``data.buckets``."""
    vae_factor = int(getattr(vae, "downsample_factor", 1))
    network_factor = int(getattr(network, "downsample_factor", 1))
    name = key or f"data.resolution={resolution}"
    fix = "its sides" if key else "data.resolution"
    if resolution % vae_factor:
        raise ValueError(
            f"{name}: {resolution} px is not divisible by the VAE's downsampling factor {vae_factor} "
            f"(2 ** (len(model.vae.ch_mult) - 1)); set {fix} to a multiple of {vae_factor}"
        )
    if (resolution // vae_factor) % network_factor:
        step = vae_factor * network_factor
        raise ValueError(
            f"{name}: {resolution} px gives {resolution // vae_factor}-px latents, not divisible by the "
            f"network's downsampling factor {network_factor} (2 ** (len(model.network.channel_mult) - 1)); "
            f"set {fix} to a multiple of {step}"
        )


def check_datamodule(datamodule: Any, vae: nn.Module, network: nn.Module, text_encoder: nn.Module) -> None:
    """The data's image sizes (``data.resolution``, each side of ``data.buckets``) against the VAE and the network,
    and its batches' size fields against micro-conditioning."""
    resolution = getattr(datamodule, "resolution", None)
    if resolution is not None:
        check_resolution(resolution, vae, network)
    check_size_fields(text_encoder, datamodule)
    for index, bucket in enumerate(getattr(datamodule, "buckets", None) or []):
        for side in bucket:
            check_resolution(side, vae, network, key=f"data.buckets[{index}]={list(bucket)}")


def clip_fused_optimizer_gradients(module: Any, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None,
                                   gradient_clip_algorithm: str | None) -> bool:
    """Clip the gradients of an optimizer that unscales inside ``step()`` (fused AdamW) when no gradient scaler
    runs; returns False where Lightning's own clipping applies.

    Lightning's mixed-precision plugin refuses to clip for such optimizers because of fp16's gradient scaler.
    Without a scaler (bf16-mixed, 32-true) the gradients are already true values, so clipping them here is what
    Lightning would do; with a scaler it still refuses."""
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    if not (gradient_clip_val and scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False)):
        return False
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if gradient_clip_algorithm == "value":
        torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
    else:
        torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)
    return True
