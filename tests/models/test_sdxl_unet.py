"""The SDXL U-Net: per-level transformer depths, a middle-block depth and the extra vector ``y``
(``adm_in_channels``), in the original SDXL key layout; equal in size to diffusers' SDXL-base U-Net and equal
in output to diffusers' UNet2DConditionModel with ``addition_embed_type="text_time"`` after mapping weights."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.interchange.diffusers_configs import unet_config, unet_model_config
from ldm.interchange.diffusers_keys import diffusers_unet_to_ldm, ldm_unet_to_diffusers
from ldm.interchange.build import full_config
from ldm.models.conditioner import size_embedding
from ldm.models.unet import UNetModel

diffusers = pytest.importorskip("diffusers")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"

# Facts of SDXL base 1.0's U-Net as published in diffusers' stabilityai/stable-diffusion-xl-base-1.0
# unet/config.json (the fields that differ from UNet2DConditionModel's defaults); the same architecture as
# generative-models' configs/inference/sd_xl_base.yaml (model_channels 320, channel_mult [1, 2, 4],
# attention_resolutions [4, 2], transformer_depth [1, 2, 10], num_head_channels 64, context_dim 2048,
# adm_in_channels 2816, use_linear_in_transformer).
SDXL_BASE_DIFFUSERS_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_BASE_UNET_PARAMETERS = 2_567_463_684  # the figure; the test checks diffusers builds this too


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_preset_has_the_size_and_keys_of_diffusers_sdxl_base_unet():
    with torch.device("meta"):
        unet = instantiate(OmegaConf.load(CONFIGS / "network/sdxl.yaml"))
        reference = diffusers.UNet2DConditionModel(**SDXL_BASE_DIFFUSERS_UNET)
    assert count(reference) == SDXL_BASE_UNET_PARAMETERS
    assert count(unet) == SDXL_BASE_UNET_PARAMETERS
    state = {key: tuple(value.shape) for key, value in unet.state_dict().items()}
    assert state["label_emb.0.0.weight"] == (1280, 2816)
    assert state["label_emb.0.2.weight"] == (1280, 1280)
    assert "input_blocks.1.1.norm.weight" not in state  # no attention at the first level
    assert "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight" in state
    assert "middle_block.1.transformer_blocks.9.ff.net.2.weight" in state
    mapped = {key: tuple(value.shape) for key, value in
              ldm_unet_to_diffusers(unet.state_dict(), layers_per_block=2).items()}
    assert mapped == {key: tuple(value.shape) for key, value in reference.state_dict().items()}


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter so zero-initialised layers do not hide a wrong mapping."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


TIME_DIM = 8  # the size embeddings' width (SDXL: 256)
POOLED_DIM = 16
TINY_LDM = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                num_head_channels=16, transformer_depth=(1, 2, 3), context_dim=24,
                adm_in_channels=POOLED_DIM + 6 * TIME_DIM, use_linear_in_transformer=True, norm_num_groups=8)
TINY_DIFFUSERS = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    norm_num_groups=8, cross_attention_dim=24, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                 "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=[2, 4, 4],
    transformer_layers_per_block=[1, 2, 3], use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_DIM,
)


def inputs():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 16, generator=generator)
    t = torch.tensor([1.0, 417.5, 998.25])
    context = torch.randn(3, 7, 24, generator=generator)
    pooled = torch.randn(3, POOLED_DIM, generator=generator)
    time_ids = torch.tensor([[1024, 768, 0, 0, 1024, 1024], [512, 2048, 64, 128, 512, 1024], [64, 64, 3, 5, 32, 64]],
                            dtype=torch.float32)
    return x, t, context, pooled, time_ids


def diffusers_output(reference, x, t, context, pooled, time_ids):
    return reference(x, t, encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def ldm_output(unet, x, t, context, pooled, time_ids):
    # ldm's y: the pooled embedding, then each size value's sinusoidal embedding, as the SDXL conditioner builds it
    y = torch.cat([pooled, size_embedding(time_ids, TIME_DIM)], dim=1)
    return unet(x, t, context, y=y)


def assert_same_outputs(reference, unet) -> None:
    with torch.no_grad():
        expected = diffusers_output(reference, *inputs())
        out = ldm_output(unet, *inputs())
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_tiny_sdxl_unet_matches_diffusers_from_diffusers_weights():
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**TINY_DIFFUSERS).eval()
    randomize(reference, seed=1)
    unet = UNetModel(**TINY_LDM).eval()
    unet.load_state_dict(diffusers_unet_to_ldm(reference.state_dict(), layers_per_block=1), strict=True)
    assert_same_outputs(reference, unet)


def test_tiny_sdxl_unet_matches_diffusers_from_ldm_weights_and_config():
    """ldm -> diffusers: the config ldm writes builds diffusers' U-Net, which loads the mapped weights."""
    torch.manual_seed(0)
    unet = UNetModel(**TINY_LDM).eval()
    randomize(unet, seed=3)
    config = unet_config(full_config({"_target_": "ldm.models.unet.UNetModel", **TINY_LDM}), sample_size=8,
                         addition_time_embed_dim=TIME_DIM)
    reference = diffusers.UNet2DConditionModel.from_config(config).eval()
    reference.load_state_dict(ldm_unet_to_diffusers(unet.state_dict(), layers_per_block=1), strict=True)
    assert_same_outputs(reference, unet)
    back = unet_model_config(config)
    assert list(back["transformer_depth"]) == [1, 2, 3] and back["adm_in_channels"] == TINY_LDM["adm_in_channels"]


def test_unet_refuses_a_missing_or_misshapen_vector():
    unet = UNetModel(**TINY_LDM).eval()
    x, t, context, pooled, time_ids = inputs()
    with pytest.raises(ValueError, match="adm_in_channels=64"):
        unet(x, t, context)
    with pytest.raises(ValueError, match="adm_in_channels"):
        UNetModel(**{**TINY_LDM, "adm_in_channels": None})(x, t, context, y=pooled)
    with pytest.raises(ValueError, match="transformer_depth"):
        UNetModel(**{**TINY_LDM, "transformer_depth": (1, 2)})


# diffusers' stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (fields besides AutoencoderKL's defaults)
SDXL_BASE_DIFFUSERS_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                               sample_size=1024, down_block_types=["DownEncoderBlock2D"] * 4,
                               up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.13025, force_upcast=True)


def test_sdxl_vae_preset_is_the_sd_architecture_of_diffusers_sdxl_vae():
    with torch.device("meta"):
        vae = instantiate(OmegaConf.load(CONFIGS / "vae/sdxl.yaml"))
        reference = diffusers.AutoencoderKL(**SDXL_BASE_DIFFUSERS_VAE)
    assert count(vae) == count(reference) == 83_653_863


def test_ldms_sdxl_file_layout_is_what_diffusers_single_file_loader_reads_as_sdxl_base():
    """The presets' original-layout state (meta device): diffusers' single-file code recognises it as SDXL
    base and its U-Net converter gives diffusers' SDXL U-Net's keys and shapes."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    from ldm.interchange.original_file import original_checkpoint_state

    text = OmegaConf.load(CONFIGS / "text_encoder/sdxl.yaml")
    for tower in text.text_encoders:
        tower.pretrained = None
    with torch.device("meta"):
        unet = instantiate(OmegaConf.load(CONFIGS / "network/sdxl.yaml"))
        vae = instantiate(OmegaConf.load(CONFIGS / "vae/sdxl.yaml"))
        towers = instantiate(text).text_encoders
        reference = diffusers.UNet2DConditionModel(**SDXL_BASE_DIFFUSERS_UNET)
    checkpoint = original_checkpoint_state(unet.state_dict(), vae.state_dict(),
                                           [tower.tower.state_dict() for tower in towers], text_layout="sdxl")
    assert single_file_utils.infer_diffusers_model_type(checkpoint) == "xl_base"
    # a released file's architecture, read back from these shapes, is the presets'
    from ldm.interchange.original_configs import sdxl_conditioner_config_from_weights, unet_config_from_weights
    from ldm.interchange.original_file import split_original_file

    parts = split_original_file(checkpoint)
    inferred = unet_config_from_weights(parts["unet"])
    preset = OmegaConf.load(CONFIGS / "network/sdxl.yaml")
    for key in ("model_channels", "channel_mult", "attention_resolutions", "num_head_channels", "context_dim",
                "transformer_depth", "adm_in_channels", "use_linear_in_transformer", "norm_num_groups"):
        expected = preset[key]
        expected = sorted(expected) if key == "attention_resolutions" else (  # their order is free
            list(expected) if key in ("channel_mult", "transformer_depth") else expected)
        assert inferred[key] == expected, key
    conditioner = sdxl_conditioner_config_from_weights(parts["text_encoder"], inferred["adm_in_channels"])
    assert conditioner["size_embedding_dim"] == 256
    assert [(tower["text_cfg"]["heads"], tower["text_cfg"]["layers"], tower["quick_gelu"], tower["pad_token_id"])
            for tower in conditioner["text_encoders"]] == [(12, 12, True, 49407), (20, 32, False, 0)]
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, dict(reference.config))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_head_counts_of_levels_without_attention_are_not_read():
    """diffusers reads a level's head count only where it has attention (and the last level's for the middle
    block): a count at the first, attention-free level that gives no whole head width is a valid config."""
    torch.manual_seed(0)
    config = {**TINY_DIFFUSERS, "attention_head_dim": [3, 4, 4]}  # 32 / 3 channels per head at level 0: unused
    reference = diffusers.UNet2DConditionModel(**config).eval()
    randomize(reference, seed=1)
    read = unet_model_config(reference.config)
    assert read["num_head_channels"] == 16 and read["num_heads"] == -1
    unet = instantiate({**read, "transformer_depth": list(read["transformer_depth"])}).eval()
    unet.load_state_dict(diffusers_unet_to_ldm(reference.state_dict(), layers_per_block=1), strict=True)
    assert_same_outputs(reference, unet)


def test_head_widths_that_differ_between_attention_levels_are_refused():
    """The middle block reads the last level's count: 64 / 2 = 32 there against 64 / 4 = 16 at level 1."""
    with pytest.raises(ValueError, match=r"head widths \[16.0, 32.0\].*heads by level: \{1: 4, 2: 2\}"):
        unet_model_config({**TINY_DIFFUSERS, "attention_head_dim": [3, 4, 2]})
