"""Several frozen text towers and the micro-conditioning vector (ldm.models.conditioner), and the SDXL
text-tower preset, whose towers have open_clip's own sizes."""

from pathlib import Path

import open_clip
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.models.conditioner import default_sizes, micro_conditioning_vector, size_embedding

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_text_towers_have_open_clips_sizes_and_fit_the_sdxl_unet():
    config = OmegaConf.load(CONFIGS / "text_encoder/sdxl.yaml")
    for tower in config.text_encoders:
        tower.pretrained = None  # random weights: no download
    with torch.device("meta"):
        conditioner = instantiate(config)
        references = [open_clip.create_model(tower.model_name, pretrained=None, device="meta")
                      for tower in config.text_encoders]
    for encoder, reference in zip(conditioner.text_encoders, references):
        # open_clip's text tower: everything of its CLIP but the image tower
        expected = sum(p.numel() for name, p in reference.named_parameters() if not name.startswith("visual"))
        assert count(encoder) == expected
    assert [count(encoder) for encoder in conditioner.text_encoders] == [123_650_305, 694_659_841]
    unet = OmegaConf.load(CONFIGS / "network/sdxl.yaml")
    assert (conditioner.output_dim, conditioner.pooled_dim, conditioner.adm_dim) == (2048, 1280, 2816)
    assert (unet.context_dim, unet.adm_in_channels) == (2048, 2816)


@pytest.fixture(scope="module")
def tiny_conditioner():
    return instantiate(OmegaConf.load(CONFIGS / "text_encoder/tiny_xl.yaml"))


def test_conditioner_concatenates_tower_states_and_takes_the_second_towers_pooled_embedding(tiny_conditioner):
    captions = ["a red circle on a white background", "a blue square on a black background"]
    context, pooled = tiny_conditioner.encode(captions)
    first, second = tiny_conditioner.text_encoders
    assert context.shape == (2, 16, 96) and pooled.shape == (2, 32)
    torch.testing.assert_close(context[..., :32], first(captions), rtol=0, atol=0)
    torch.testing.assert_close(context[..., 32:], second(captions), rtol=0, atol=0)
    # the pooled embedding is open_clip's own text embedding of the second tower
    torch.testing.assert_close(pooled, second.tower(second.tokenize(captions)), rtol=1e-5, atol=1e-6)
    # penultimate states without the final LayerNorm: the second tower's first two of three blocks
    tower = second.tower
    x = tower.token_embedding(second.tokenize(captions)) + tower.positional_embedding
    for block in tower.transformer.resblocks[:2]:
        x = block(x, attn_mask=tower.attn_mask)
    torch.testing.assert_close(context[..., 32:], x, rtol=1e-5, atol=1e-6)


def test_empty_captions_get_zero_states_and_pooled_embedding(tiny_conditioner):
    context, pooled = tiny_conditioner.encode(["", "a red circle on a white background"])
    assert context[0].abs().max() == 0 and pooled[0].abs().max() == 0
    assert context[1].abs().max() > 0 and pooled[1].abs().max() > 0


def test_size_embedding_is_diffusers_add_time_proj():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    sizes = torch.tensor([[1024, 768], [0, 64], [33, 5]])
    # diffusers' SDXL U-Net embeds each of the six time ids with Timesteps(256, flip_sin_to_cos=True, 0)
    expected = embeddings.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(sizes.flatten())
    torch.testing.assert_close(size_embedding(sizes, 256), expected.reshape(3, -1), rtol=1e-6, atol=1e-6)


def test_vector_is_pooled_then_sizes_and_dropped_conditions_are_zero(tiny_conditioner):
    pooled = torch.randn(2, 32)
    sizes = default_sizes(32, 64, 2, crop_coords=(4, 8))
    assert sizes["original_size"].tolist() == [[32, 64]] * 2 and sizes["crop_coords"].tolist() == [[4, 8]] * 2
    keep = {"original_size": torch.tensor([True, False]), "crop_coords": torch.tensor([True, True]),
            "target_size": torch.tensor([True, True])}
    y = tiny_conditioner.vector(pooled, sizes, keep)
    assert y.shape == (2, 128)
    torch.testing.assert_close(y[:, :32], pooled)
    torch.testing.assert_close(y[0, 32:64], size_embedding(torch.tensor([[32, 64]]), 16)[0])
    assert y[1, 32:64].abs().max() == 0 and y[1, 64:96].abs().max() > 0
    whole = micro_conditioning_vector(pooled, [sizes[name] for name in ("original_size", "crop_coords", "target_size")],
                                      16)
    torch.testing.assert_close(whole[0], y[0])
    with pytest.raises(KeyError, match="target_size"):
        tiny_conditioner.vector(pooled, {"original_size": sizes["original_size"], "crop_coords": sizes["crop_coords"]})
