"""Original Stable Diffusion single-file checkpoints (CompVis/Stability layout), read and written.

Prefixes: ``model.diffusion_model.`` (U-Net), ``model_ema.`` (its EMA, names without dots),
``first_stage_model.`` (VAE) and the text encoder under ``cond_stage_model.model.`` in OpenCLIP's
layout (SD 2.x) or ``cond_stage_model.transformer.`` in transformers' CLIP layout (SD 1.x). SDXL files
keep their two towers under ``conditioner.embedders.0.transformer.`` (CLIP ViT-L/14, transformers' layout)
and ``conditioner.embedders.1.model.`` (OpenCLIP ViT-bigG/14 with its pooled projection, OpenCLIP's layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ldm.checkpoints import CheckpointMismatchError, read_state_dict, save_weights
from ldm.interchange.clip_text import PROJECTION_KEY, hf_text_to_open_clip, open_clip_text_to_hf, used_text_keys

ORIGINAL_UNET_PREFIX = "model.diffusion_model."
ORIGINAL_VAE_PREFIX = "first_stage_model."
ORIGINAL_EMA_PREFIX = "model_ema."
OPEN_CLIP_TEXT_PREFIX = "cond_stage_model.model."
HF_TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_HF_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_TEXT_PREFIX = "conditioner.embedders.1.model."
TEXT_LAYOUTS = ("open_clip", "hf", "sdxl")


def _keys_under(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries whose keys start with ``prefix``, with the prefix removed."""
    return {key.removeprefix(prefix): tensor for key, tensor in state_dict.items() if key.startswith(prefix)}


def original_ema_key(unet_key: str) -> str:
    """Where an original SD checkpoint keeps the EMA copy of a U-Net weight: the EMA stores each
    ``model.<name>`` as a buffer named ``model_ema.<name without dots>``."""
    return ORIGINAL_EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def split_original_checkpoint(state_dict: dict[str, Tensor], use_ema: bool = False) -> dict[str, dict[str, Tensor]]:
    """An original SD checkpoint's tensors -> ``{"unet": ..., "vae": ...}`` in ldm's key names.

    With ``use_ema`` the U-Net takes the checkpoint's EMA weights; a checkpoint without them (or
    with only some) raises ``CheckpointMismatchError`` naming what is missing.
    """
    unet, vae = (_keys_under(state_dict, prefix) for prefix in (ORIGINAL_UNET_PREFIX, ORIGINAL_VAE_PREFIX))
    if not unet or not vae:
        raise CheckpointMismatchError(
            f"not an original SD checkpoint: no keys under {ORIGINAL_UNET_PREFIX!r}" if not unet
            else f"not a full original SD checkpoint: no VAE keys under {ORIGINAL_VAE_PREFIX!r}")
    if use_ema:
        missing = sorted(original_ema_key(key) for key in unet if original_ema_key(key) not in state_dict)
        if missing:
            raise CheckpointMismatchError(f"use_ema: the checkpoint lacks {len(missing)} EMA weight(s), e.g. "
                                          + ", ".join(missing[:5]))
        unet = {key: state_dict[original_ema_key(key)] for key in unet}
    return {"unet": unet, "vae": vae}


def is_sdxl_file(state_dict: dict[str, Tensor]) -> bool:
    """Whether an original file keeps its text towers in SDXL's ``conditioner.embedders.*`` layout."""
    return any(key.startswith((SDXL_HF_TEXT_PREFIX, SDXL_OPEN_CLIP_TEXT_PREFIX)) for key in state_dict)


def original_text_encoder(state_dict: dict[str, Tensor]) -> dict[str, Tensor] | list[dict[str, Tensor]] | None:
    """The text tower of an original checkpoint in OpenCLIP keys (SDXL: a list of its two towers, the second
    with its projection), or None when it has none."""
    if is_sdxl_file(state_dict):
        first = _keys_under(state_dict, SDXL_HF_TEXT_PREFIX)
        second = _keys_under(state_dict, SDXL_OPEN_CLIP_TEXT_PREFIX)
        if not first or not second:
            raise CheckpointMismatchError(f"an SDXL file needs both text towers, under {SDXL_HF_TEXT_PREFIX!r} and "
                                          f"{SDXL_OPEN_CLIP_TEXT_PREFIX!r}; one is missing")
        return [hf_text_to_open_clip(first), used_text_keys(second, with_projection=True)]
    open_clip = _keys_under(state_dict, OPEN_CLIP_TEXT_PREFIX)
    if open_clip:
        return used_text_keys(open_clip)
    hf = _keys_under(state_dict, HF_TEXT_PREFIX)
    return hf_text_to_open_clip(hf) if hf else None


def split_original_file(state_dict: dict[str, Tensor], use_ema: bool = False) -> dict[str, Any]:
    """An original SD file's tensors -> ``{"unet", "vae"}`` in ldm's keys and, when the file has them,
    ``"text_encoder"`` in OpenCLIP's and (without ``use_ema``) ``"ema_unet"``, its EMA U-Net."""
    parts: dict[str, Any] = dict(split_original_checkpoint(state_dict, use_ema=use_ema))
    text = original_text_encoder(state_dict)
    if text is not None:
        parts["text_encoder"] = text
    if not use_ema and any(original_ema_key(key) in state_dict for key in parts["unet"]):
        parts["ema_unet"] = split_original_checkpoint(state_dict, use_ema=True)["unet"]
    return parts


def read_original_checkpoint(path: str | Path, use_ema: bool = False) -> dict[str, Any]:
    """An original SD ``.ckpt`` (weights only) or ``.safetensors`` file, split as ``split_original_file`` does."""
    return split_original_file(read_state_dict(path), use_ema=use_ema)


def original_checkpoint_state(
    unet_state: dict[str, Tensor],
    vae_state: dict[str, Tensor],
    text_state: dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None,
    text_layout: str = "open_clip",
    ema_state: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """ldm state dicts -> one original-layout state dict. ``text_state`` is an OpenCLIP text tower's (for
    ``text_layout="sdxl"``: the two towers' in a list); ``text_layout`` "open_clip" (SD 2.x), "hf" (SD 1.x)
    or "sdxl"; ``ema_state`` an EMA U-Net's, stored as ``model_ema.*``."""
    if text_layout not in TEXT_LAYOUTS:
        raise ValueError(f"text_layout={text_layout!r}; choose one of {TEXT_LAYOUTS}")
    state = {ORIGINAL_UNET_PREFIX + key: value for key, value in unet_state.items()}
    state.update({ORIGINAL_VAE_PREFIX + key: value for key, value in vae_state.items()})
    if ema_state is not None:
        state.update({original_ema_key(key): value for key, value in ema_state.items()})
    if text_state is not None:
        if text_layout == "sdxl":
            if isinstance(text_state, dict) or len(text_state) != 2:
                raise ValueError("text_layout='sdxl' takes the state dicts of two text towers (CLIP-L, OpenCLIP bigG)")
            first, second = text_state
            if PROJECTION_KEY not in second:
                raise ValueError("the second SDXL text tower has no text_projection (its pooled projection)")
            state.update({SDXL_HF_TEXT_PREFIX + key: value for key, value in open_clip_text_to_hf(first).items()})
            state.update({SDXL_OPEN_CLIP_TEXT_PREFIX + key: value
                          for key, value in used_text_keys(second, with_projection=True).items()})
        elif text_layout == "open_clip":
            state.update({OPEN_CLIP_TEXT_PREFIX + key: value for key, value in used_text_keys(text_state).items()})
        else:
            state.update({HF_TEXT_PREFIX + key: value for key, value in open_clip_text_to_hf(text_state).items()})
    return state


def write_original_checkpoint(path: str | Path, state: dict[str, Tensor], metadata: dict[str, Any] | None = None) -> Path:
    """Write an original-layout state dict as one ``.safetensors`` file (atomically)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single-file export writes .safetensors only (never pickles)")
    return save_weights(state, path, metadata=metadata)
