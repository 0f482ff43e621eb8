"""ldm's U-Net and VAE compute what diffusers' UNet2DConditionModel and AutoencoderKL compute, and their
state-dict layout is the original checkpoint's, as diffusers' own single-file converter reads it.

Diffusers weights come into ldm's (= the original) key layout through ``ldm.interchange.diffusers_keys``'
``diffusers_unet_to_ldm`` / ``diffusers_vae_to_ldm`` and go back through ``ldm_unet_to_diffusers`` /
``ldm_vae_to_diffusers``.
"""

import pytest
import torch

from ldm.interchange.diffusers_keys import (
    diffusers_unet_to_ldm,
    diffusers_vae_to_ldm,
    ldm_unet_to_diffusers,
    ldm_vae_to_diffusers,
)
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.unet import UNetModel

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


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
    assert_same_state(ldm_unet_to_diffusers(unet.state_dict(), layers_per_block=1), reference.state_dict())


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
    assert_same_state(ldm_vae_to_diffusers(vae.state_dict(), num_levels=3), reference.state_dict())


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
    assert meta_shapes(ldm_unet_to_diffusers(unet.state_dict(), layers_per_block=2)) == meta_shapes(
        reference.state_dict())


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
    assert meta_shapes(ldm_vae_to_diffusers(vae.state_dict(), num_levels=4)) == meta_shapes(reference.state_dict())
