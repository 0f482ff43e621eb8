"""OpenCLIP text-tower keys <-> transformers' ``CLIPTextModel`` keys, both ways.

Original SD 2.x files keep the OpenCLIP layout (``cond_stage_model.model.*``); SD 1.x files and
diffusers folders keep transformers' (``text_model.*``). The two differ in names and in that
OpenCLIP packs q, k and v into one ``in_proj`` matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.checkpoints import CheckpointMismatchError

HF_PREFIX = "text_model."
# OpenCLIP tensors that per-token context never uses (the pooled projection and the contrastive
# temperature): left out of conversions and not required when loading.
UNUSED_OPEN_CLIP_KEYS = ("text_projection", "logit_scale", "logit_bias", "attn_mask")
_BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_FIXED_NAMES = {"token_embedding.weight": "embeddings.token_embedding.weight",
                "positional_embedding": "embeddings.position_embedding.weight",
                "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}


PROJECTION_KEY = "text_projection"  # OpenCLIP's (width, output_dim) matrix; transformers' Linear holds its transpose
HF_PROJECTION_KEY = "text_projection.weight"


def used_text_keys(state_dict: dict[str, Tensor], with_projection: bool = False) -> dict[str, Tensor]:
    """The OpenCLIP text-tower entries that per-token context depends on, and with ``with_projection`` the
    pooled projection too (SDXL's pooled embedding needs it)."""
    return {key: value for key, value in state_dict.items() if key.split(".")[0] not in UNUSED_OPEN_CLIP_KEYS
            or (with_projection and key == PROJECTION_KEY)}


def open_clip_text_to_hf(state_dict: dict[str, Tensor], num_layers: int | None = None,
                         with_projection: bool = False) -> dict[str, Tensor]:
    """OpenCLIP text tower (``token_embedding``, ``transformer.resblocks.N``, ``ln_final``) -> ``text_model.*``.

    ``num_layers`` keeps only the first blocks: SD 2.x reads the penultimate block, so its diffusers
    text encoder is the tower without its last block. ``with_projection``: also the pooled projection, as
    ``CLIPTextModelWithProjection``'s ``text_projection.weight`` (SDXL's second tower). Raises
    ``CheckpointMismatchError`` naming keys outside the layout.
    """
    converted, unplaced = {}, []
    if with_projection:
        converted[HF_PROJECTION_KEY] = state_dict[PROJECTION_KEY].T.contiguous()
    for key, tensor in used_text_keys(state_dict).items():
        if key in _FIXED_NAMES:
            converted[HF_PREFIX + _FIXED_NAMES[key]] = tensor
            continue
        parts = key.split(".")
        if parts[:2] != ["transformer", "resblocks"] or len(parts) < 5:
            unplaced.append(key)
            continue
        index, name, leaf = int(parts[2]), ".".join(parts[3:-1]), parts[-1]
        if num_layers is not None and index >= num_layers:
            continue
        layer = f"{HF_PREFIX}encoder.layers.{index}."
        if name == "attn" and leaf in ("in_proj_weight", "in_proj_bias"):
            for projection, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                converted[f"{layer}self_attn.{projection}_proj.{leaf.removeprefix('in_proj_')}"] = chunk.clone()
        elif name in _BLOCK_NAMES:
            converted[f"{layer}{_BLOCK_NAMES[name]}.{leaf}"] = tensor
        else:
            unplaced.append(key)
    if unplaced:
        raise CheckpointMismatchError(f"{len(unplaced)} key(s) are not part of an OpenCLIP text tower: "
                                      + ", ".join(sorted(unplaced)[:20]))
    return converted


def hf_text_to_open_clip(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' ``CLIPTextModel`` state dict (with or without ``text_model.``) -> OpenCLIP text-tower keys.

    Ignores ``position_ids``; a ``CLIPTextModelWithProjection``'s projection becomes OpenCLIP's
    ``text_projection``. Raises ``CheckpointMismatchError`` naming other keys outside the layout or a layer
    that lacks one of q, k, v.
    """
    fixed = {value: key for key, value in _FIXED_NAMES.items()}
    block_names = {value: key for key, value in _BLOCK_NAMES.items()}
    converted: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    unplaced = []
    for key, tensor in state_dict.items():
        if key == HF_PROJECTION_KEY:
            converted[PROJECTION_KEY] = tensor.T.contiguous()
            continue
        key = key.removeprefix(HF_PREFIX)
        if key.endswith("position_ids"):
            continue
        if key in fixed:
            converted[fixed[key]] = tensor
            continue
        parts = key.split(".")
        if parts[:2] != ["encoder", "layers"] or len(parts) < 5:
            unplaced.append(key)
            continue
        index, name, leaf = int(parts[2]), ".".join(parts[3:-1]), parts[-1]
        block = f"transformer.resblocks.{index}."
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((index, leaf), {})[name[-6]] = tensor
        elif name in block_names:
            converted[f"{block}{block_names[name]}.{leaf}"] = tensor
        else:
            unplaced.append(key)
    for (index, leaf), parts_by_name in qkv.items():
        if sorted(parts_by_name) != ["k", "q", "v"]:
            unplaced.append(f"encoder.layers.{index}.self_attn (has only {sorted(parts_by_name)} of q, k, v)")
            continue
        converted[f"transformer.resblocks.{index}.attn.in_proj_{leaf}"] = torch.cat(
            [parts_by_name[name] for name in "qkv"], dim=0)
    if unplaced:
        raise CheckpointMismatchError(f"{len(unplaced)} key(s) are not part of a CLIPTextModel: "
                                      + ", ".join(sorted(unplaced)[:20]))
    return converted
