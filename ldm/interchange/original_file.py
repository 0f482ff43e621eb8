"""Original Stable Diffusion single-file checkpoints (CompVis/Stability layout), read and written.

Prefixes: ``model.diffusion_model.`` (U-Net), ``model_ema.`` (its EMA, names without dots),
``first_stage_model.`` (VAE) and the text encoder under ``cond_stage_model.model.`` in OpenCLIP's
layout (SD 2.x) or ``cond_stage_model.transformer.`` in transformers' CLIP layout (SD 1.x).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from ldm.checkpoints import (
    ORIGINAL_UNET_PREFIX,
    ORIGINAL_VAE_PREFIX,
    original_ema_key,
    read_state_dict,
    save_weights,
    split_original_checkpoint,
)
from ldm.interchange.clip_text import hf_text_to_open_clip, open_clip_text_to_hf, used_text_keys

OPEN_CLIP_TEXT_PREFIX = "cond_stage_model.model."
HF_TEXT_PREFIX = "cond_stage_model.transformer."
TEXT_LAYOUTS = ("open_clip", "hf")


def original_text_encoder(state_dict: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The text tower of an original checkpoint in OpenCLIP keys, or None when it has none."""
    open_clip = {k.removeprefix(OPEN_CLIP_TEXT_PREFIX): v for k, v in state_dict.items() if k.startswith(OPEN_CLIP_TEXT_PREFIX)}
    if open_clip:
        return used_text_keys(open_clip)
    hf = {k.removeprefix(HF_TEXT_PREFIX): v for k, v in state_dict.items() if k.startswith(HF_TEXT_PREFIX)}
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
    text_state: dict[str, Tensor] | None = None,
    text_layout: str = "open_clip",
    ema_state: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """ldm state dicts -> one original-layout state dict. ``text_state`` is an OpenCLIP text tower's;
    ``text_layout`` "open_clip" (SD 2.x) or "hf" (SD 1.x); ``ema_state`` an EMA U-Net's, stored as
    ``model_ema.*``."""
    if text_layout not in TEXT_LAYOUTS:
        raise ValueError(f"text_layout={text_layout!r}; choose one of {TEXT_LAYOUTS}")
    state = {ORIGINAL_UNET_PREFIX + key: value for key, value in unet_state.items()}
    state.update({ORIGINAL_VAE_PREFIX + key: value for key, value in vae_state.items()})
    if ema_state is not None:
        state.update({original_ema_key(key): value for key, value in ema_state.items()})
    if text_state is not None:
        if text_layout == "open_clip":
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
