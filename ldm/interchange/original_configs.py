"""Model configs read from the tensors of an original SD single file that carries no config of its own.

Released SD files hold weights only; the architecture is read back from their shapes. The one thing
shapes do not tell is the attention head count: the SD conventions apply (8 heads at context 768 as
in SD 1.x, 64-channel heads otherwise as in SD 2.x); give ``model_config`` to override.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

SD1_CONTEXT_DIM = 768
SD_HEAD_CHANNELS = 64
SD1_NUM_HEADS = 8


def _count(state: dict[str, Tensor], pattern: str) -> int:
    """How many distinct integers fill the ``(\\d+)`` of ``pattern`` over the keys."""
    regex = re.compile(pattern)
    return len({match.group(1) for key in state if (match := regex.match(key))})


def unet_config_from_weights(unet: dict[str, Tensor]) -> dict[str, Any]:
    """``UNetModel`` config of an original-layout U-Net state dict (keys without ``model.diffusion_model.``)."""
    channels = int(unet["input_blocks.0.0.weight"].shape[0])
    levels = _count(unet, r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    num_input_blocks = _count(unet, r"input_blocks\.(\d+)\.")
    num_res_blocks = (num_input_blocks - 1 - (levels - 1)) // levels
    first_block = [1 + level * (num_res_blocks + 1) for level in range(levels)]
    mult = [int(unet[f"input_blocks.{block}.0.in_layers.2.weight"].shape[0]) // channels for block in first_block]
    attention = [2**level for level, block in enumerate(first_block) if f"input_blocks.{block}.1.norm.weight" in unet]
    if not attention:
        raise ValueError("the U-Net has no transformer blocks: not a text-conditioned SD U-Net")
    block = first_block[[2**level for level in range(levels)].index(attention[0])]
    prefix = f"input_blocks.{block}.1."  # the first transformer: context width, projections
    context_dim = int(unet[prefix + "transformer_blocks.0.attn2.to_k.weight"].shape[1])
    width = int(unet[prefix + "norm.weight"].shape[0])
    emb_out = int(unet[f"input_blocks.{first_block[0]}.0.emb_layers.1.weight"].shape[0])
    sd1_heads = context_dim == SD1_CONTEXT_DIM
    # per level, the depth of its first transformer (SDXL: [1, 2, 10]; 1 where a level has none, as SDXL writes)
    depths = [_count(unet, rf"input_blocks\.{block}\.1\.transformer_blocks\.(\d+)\.") or 1 for block in first_block]
    middle_depth = _count(unet, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    adm = unet.get("label_emb.0.0.weight")
    return {
        "_target_": "ldm.models.unet.UNetModel",
        "in_channels": int(unet["input_blocks.0.0.weight"].shape[1]), "out_channels": int(unet["out.2.weight"].shape[0]),
        "model_channels": channels, "num_res_blocks": num_res_blocks, "attention_resolutions": attention,
        "channel_mult": mult, "num_heads": SD1_NUM_HEADS if sd1_heads else -1,
        "num_head_channels": -1 if sd1_heads else SD_HEAD_CHANNELS, "context_dim": context_dim,
        "transformer_depth": depths[0] if len(set(depths)) == 1 else depths,
        "transformer_depth_middle": None if middle_depth == depths[-1] else middle_depth,
        "adm_in_channels": None if adm is None else int(adm.shape[1]),
        "use_linear_in_transformer": unet[prefix + "proj_in.weight"].ndim == 2,
        "use_scale_shift_norm": emb_out == 2 * channels * mult[0],
        "norm_num_groups": 32 if width % 32 == 0 else 1,
    }


def vae_config_from_weights(vae: dict[str, Tensor], resolution: int = 256) -> dict[str, Any]:
    """``AutoencoderKL`` config of an original-layout VAE state dict (keys without ``first_stage_model.``)."""
    ch = int(vae["encoder.conv_in.weight"].shape[0])
    levels = _count(vae, r"encoder\.down\.(\d+)\.")
    mult = [int(vae[f"encoder.down.{level}.block.0.conv1.weight"].shape[0]) // ch for level in range(levels)]
    return {
        "_target_": "ldm.models.autoencoder.AutoencoderKL",
        "in_channels": int(vae["encoder.conv_in.weight"].shape[1]), "out_channels": int(vae["decoder.conv_out.weight"].shape[0]),
        "ch": ch, "ch_mult": mult, "num_res_blocks": _count(vae, r"encoder\.down\.0\.block\.(\d+)\."),
        "z_channels": int(vae["decoder.conv_in.weight"].shape[1]), "embed_dim": int(vae["post_quant_conv.weight"].shape[0]),
        "attn_resolutions": [], "resolution": resolution, "dropout": 0.0, "double_z": True,
        "norm_num_groups": 32 if ch % 32 == 0 else 1, "mid_attention": "encoder.mid.attn_1.q.weight" in vae,
    }


def sdxl_conditioner_config_from_weights(towers: list[dict[str, Tensor]], adm_in_channels: int) -> dict[str, Any]:
    """``TextConditioner`` config of SDXL's two text towers (OpenCLIP keys; the second with its projection):
    penultimate states without the final LayerNorm, CLIP-L padded with the end token and GELU/QuickGELU as
    released (OpenAI's CLIP-L: QuickGELU), the second tower's pooled embedding, and the three size conditions
    whose width fills the U-Net's ``adm_in_channels``."""
    configs = []
    for index, text in enumerate(towers):
        config = text_encoder_config_from_weights(text, sd1_layout=index == 0)
        if index == 1:
            config["text_cfg"]["output_dim"] = int(text["text_projection"].shape[1])
        configs.append({**config, "layer": "penultimate", "final_norm": False})
    pooled_dim = configs[1]["text_cfg"]["output_dim"]
    size_dim, remainder = divmod(adm_in_channels - pooled_dim, 6)
    if remainder or size_dim < 2:
        raise ValueError(f"the U-Net's adm_in_channels={adm_in_channels} is not the pooled embedding ({pooled_dim}) "
                         "plus six size embeddings: not an SDXL base U-Net")
    return {"_target_": "ldm.models.conditioner.TextConditioner", "text_encoders": configs, "pooled_encoder": 1,
            "size_conditions": ["original_size", "crop_coords", "target_size"], "size_embedding_dim": size_dim,
            "zero_empty_prompt": True}


def text_encoder_config_from_weights(text: dict[str, Tensor], sd1_layout: bool) -> dict[str, Any]:
    """``FrozenOpenCLIPTextEncoder`` config of an OpenCLIP text-tower state dict: SD 1.x's (stored in
    transformers' layout: QuickGELU, last layer, padded with the end token) or SD 2.x's (GELU, penultimate
    layer, padded with 0). Head width 64, as in every CLIP text tower."""
    width = int(text["token_embedding.weight"].shape[1])
    return {
        "_target_": "ldm.models.text_encoders.FrozenOpenCLIPTextEncoder",
        "text_cfg": {
            "context_length": int(text["positional_embedding"].shape[0]),
            "vocab_size": int(text["token_embedding.weight"].shape[0]), "width": width,
            "heads": max(1, width // SD_HEAD_CHANNELS),
            "layers": _count(text, r"transformer\.resblocks\.(\d+)\."),
            "mlp_ratio": int(text["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]) / width, "output_dim": width,
        },
        "layer": "last" if sd1_layout else "penultimate", "pad_token_id": 49407 if sd1_layout else 0,
        "quick_gelu": sd1_layout,
    }
