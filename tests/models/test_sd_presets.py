"""The SD 1.x / 2.x presets (configs/model/network/sd1.yaml, sd2.yaml, configs/model/vae/sd.yaml), built on the meta device, have the published sizes and the original checkpoint keys.

Published parameter counts: SD 1.5 U-Net 859,520,964 (diffusers' ``num_parameters`` docstring for
runwayml/stable-diffusion-v1-5), SD 2.x U-Net 865,910,724, SD VAE 83,653,863; both U-Nets have 686
tensors and the VAE 248, as under ``model.diffusion_model.`` / ``first_stage_model.`` in the checkpoints.
"""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"

UNET_KEYS_BOTH = {
    "time_embed.0.weight": (1280, 320),
    "time_embed.2.weight": (1280, 1280),
    "input_blocks.0.0.weight": (320, 4, 3, 3),
    "input_blocks.1.0.in_layers.0.weight": (320,),
    "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "input_blocks.1.0.out_layers.0.bias": (320,),
    "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
    "input_blocks.1.1.norm.weight": (320,),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": (320,),
    "input_blocks.1.1.transformer_blocks.0.norm1.weight": (320,),
    "input_blocks.1.1.transformer_blocks.0.norm3.bias": (320,),
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "middle_block.0.emb_layers.1.weight": (1280, 1280),
    "middle_block.2.in_layers.2.weight": (1280, 1280, 3, 3),
    "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "out.0.weight": (320,),
    "out.2.weight": (4, 320, 3, 3),
}
UNET_KEYS_SD1 = {
    "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
    "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight": (320, 768),
}
UNET_KEYS_SD2 = {
    "input_blocks.1.1.proj_in.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "middle_block.1.proj_out.weight": (1280, 1280),
    "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight": (320, 1024),
}
UNET_ABSENT = [
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias",  # q, k, v projections have no bias
    "input_blocks.1.0.skip_connection.weight",  # same width in and out: identity skip
    "input_blocks.10.1.norm.weight",  # no attention at the lowest resolution (factor 8)
]
VAE_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.3.block.1.norm2.bias": (512,),
    "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.norm.weight": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid.attn_1.v.bias": (512,),
    "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
VAE_ABSENT = ["encoder.down.3.downsample.conv.weight", "decoder.up.0.upsample.conv.weight",
              "encoder.down.0.block.0.nin_shortcut.weight"]


def build_on_meta(preset: str) -> torch.nn.Module:
    with torch.device("meta"):
        return instantiate(OmegaConf.load(CONFIGS / f"{preset}.yaml"))


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}


@pytest.mark.parametrize(
    "preset, count, version_keys",
    [("network/sd1", 859_520_964, UNET_KEYS_SD1), ("network/sd2", 865_910_724, UNET_KEYS_SD2)],
    ids=["sd1", "sd2"],
)
def test_sd_unet_presets_have_published_size_and_original_keys(preset, count, version_keys):
    unet = build_on_meta(preset)
    assert sum(p.numel() for p in unet.parameters()) == count
    state = shapes(unet)
    assert len(state) == 686
    for key, shape in {**UNET_KEYS_BOTH, **version_keys}.items():
        assert state.get(key) == shape, key
    assert not set(UNET_ABSENT) & set(state)


def test_sd_vae_preset_has_published_size_and_original_keys():
    vae = build_on_meta("vae/sd")
    assert vae.downsample_factor == 8
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    state = shapes(vae)
    assert len(state) == 248
    for key, shape in VAE_KEYS.items():
        assert state.get(key) == shape, key
    assert not set(VAE_ABSENT) & set(state)
