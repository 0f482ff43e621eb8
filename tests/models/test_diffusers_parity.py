"""ldm's U-Net and VAE compute what diffusers' UNet2DConditionModel and AutoencoderKL compute, and their
state-dict layout is the original checkpoint's, as diffusers' own single-file converter reads it.

``diffusers_unet_to_ldm`` / ``diffusers_vae_to_ldm`` map diffusers weights into ldm's (= the original)
key layout; they are meant to move into ldm/checkpoints.py.
"""

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.unet import UNetModel

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED_NAMES = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_unet_to_ldm(state_dict: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict -> the original SD (``model.diffusion_model.``) layout."""
    per_level = layers_per_block + 1  # input blocks per level (ResBlocks + downsampler), output blocks per level
    up_levels_with_attention = {key.split(".")[1] for key in state_dict if key.startswith("up_blocks.")
                                and ".attentions." in key}
    converted = {}
    for key, tensor in state_dict.items():
        head, _, leaf = key.rpartition(".")
        if head in UNET_FIXED_NAMES:
            converted[f"{UNET_FIXED_NAMES[head]}.{leaf}"] = tensor
            continue
        parts = key.split(".")
        if parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), parts[3:]
            prefix = f"middle_block.{1 if kind == 'attentions' else 2 * index}"
        else:
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            sub = 0 if kind == "resnets" else 1
            if parts[0] == "down_blocks":
                prefix = f"input_blocks.{1 + level * per_level + index}.{sub}"
                if kind == "downsamplers":
                    prefix, rest = f"input_blocks.{(level + 1) * per_level}.0.op", rest[1:]
            else:
                prefix = f"output_blocks.{level * per_level + index}.{sub}"
                if kind == "upsamplers":
                    position = 2 if parts[1] in up_levels_with_attention else 1
                    prefix = f"output_blocks.{level * per_level + layers_per_block}.{position}"
        if kind == "resnets":
            rest = [UNET_RESNET_NAMES[rest[0]], *rest[1:]]
        converted[".".join([prefix, *rest])] = tensor
    return converted


def diffusers_vae_to_ldm(state_dict: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict -> the original SD (``first_stage_model.``) layout."""
    converted = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            converted[key] = tensor
            continue
        coder, rest = parts[0], parts[1:]
        if rest[0] in ("down_blocks", "up_blocks"):
            level = int(rest[1]) if rest[0] == "down_blocks" else num_levels - 1 - int(rest[1])
            stage = f"{'down' if rest[0] == 'down_blocks' else 'up'}.{level}"
            if rest[2] == "resnets":
                rest = [stage, "block", rest[3], *rest[4:]]
            else:  # downsamplers.0.conv / upsamplers.0.conv
                rest = [stage, "downsample" if rest[0] == "down_blocks" else "upsample", *rest[4:]]
        elif rest[0] == "mid_block" and rest[1] == "resnets":
            rest = ["mid", f"block_{int(rest[2]) + 1}", *rest[3:]]
        elif rest[0] == "mid_block":  # attentions.0.<layer>: linear layers become 1x1 convolutions
            layer = ".".join(rest[3:-1])
            rest = ["mid", "attn_1", VAE_ATTENTION_NAMES[layer], rest[-1]]
            if tensor.ndim == 2 and layer != "group_norm":
                tensor = tensor[:, :, None, None]
        elif rest[0] == "conv_norm_out":
            rest = ["norm_out", *rest[1:]]
        rest = [{"conv_shortcut": "nin_shortcut"}.get(part, part) for part in rest]
        converted[".".join([coder, *rest])] = tensor
    return converted


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter so zero-initialised layers do not hide a wrong mapping."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


TINY_UNET_CASES = {
    # SD 1.x style: conv projections, heads by count, attention only at the lower resolution
    "sd1-like": (
        dict(attention_resolutions=(2,), num_heads=4, use_linear_in_transformer=False),
        dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, use_linear_projection=False),
    ),
    # SD 2.x style: linear projections, heads of 16 channels, attention everywhere
    "sd2-like": (
        dict(attention_resolutions=(1, 2), num_head_channels=16, use_linear_in_transformer=True),
        dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=[2, 4],
             use_linear_projection=True),
    ),
}


@pytest.mark.parametrize("case", TINY_UNET_CASES)
def test_unet_matches_diffusers_after_mapping_its_weights(case):
    ldm_args, diffusers_args = TINY_UNET_CASES[case]
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=24, **diffusers_args,
    ).eval()
    randomize(reference, seed=1)
    unet = UNetModel(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, context_dim=24, norm_num_groups=8,
                     **ldm_args).eval()
    unet.load_state_dict(diffusers_unet_to_ldm(reference.state_dict(), layers_per_block=1), strict=True)

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([1.0, 417.5, 998.25])
    context = torch.randn(3, 7, 24, generator=generator)
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context).sample
        out = unet(x, t, context)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_vae_matches_diffusers_after_mapping_its_weights():
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    ).eval()
    randomize(reference, seed=1)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=8, resolution=32).eval()
    vae.load_state_dict(diffusers_vae_to_ldm(reference.state_dict(), num_levels=3), strict=True)

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected_posterior = reference.encode(images).latent_dist
        posterior = vae.encode(images)
        latents = expected_posterior.mean
        expected_images = reference.decode(latents).sample
        images_out = vae.decode(latents)
    torch.testing.assert_close(posterior.mean, expected_posterior.mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(posterior.logvar, expected_posterior.logvar, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(images_out, expected_images, atol=1e-4, rtol=1e-4)


SD_UNETS = {
    "sd1": (dict(context_dim=768, num_heads=8), dict(cross_attention_dim=768, attention_head_dim=8)),
    "sd2": (dict(context_dim=1024, num_head_channels=64, use_linear_in_transformer=True),
            dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)),
}


def meta_shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}


@pytest.mark.parametrize("version", SD_UNETS)
def test_sd_unet_state_dict_is_what_diffusers_converter_reads_as_an_original_checkpoint(version):
    ldm_args, diffusers_args = SD_UNETS[version]
    with torch.device("meta"):
        unet = UNetModel(**ldm_args)  # defaults: SD 320 channels, (1, 2, 4, 4), attention at (4, 2, 1)
        reference = diffusers.UNet2DConditionModel(**diffusers_args)
    checkpoint = {f"model.diffusion_model.{key}": tensor for key, tensor in unet.state_dict().items()}
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, dict(reference.config))
    assert meta_shapes(converted) == meta_shapes(reference.state_dict())
    # and the test's own mapping is that converter's inverse
    assert meta_shapes(diffusers_unet_to_ldm(reference.state_dict(), layers_per_block=2)) == meta_shapes(
        unet.state_dict())


def test_sd_vae_state_dict_is_what_diffusers_converter_reads_as_an_original_checkpoint():
    with torch.device("meta"):
        vae = AutoencoderKL()  # defaults: the SD VAE
        reference = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
    checkpoint = {f"first_stage_model.{key}": tensor for key, tensor in vae.state_dict().items()}
    converted = single_file_utils.convert_ldm_vae_checkpoint(checkpoint, dict(reference.config))
    assert meta_shapes(converted) == meta_shapes(reference.state_dict())
    assert meta_shapes(diffusers_vae_to_ldm(reference.state_dict(), num_levels=4)) == meta_shapes(vae.state_dict())
