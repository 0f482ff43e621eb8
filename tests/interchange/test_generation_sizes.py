"""The pipeline generates at any size the VAE x U-Net factor divides, and mixes sizes by prompt."""

from __future__ import annotations

import pytest
import torch

from .conftest import tiny_module

SETTINGS = dict(num_inference_steps=3, guidance_scale=2.0, sampler="ddim")


@pytest.fixture(scope="module")
def pipeline():
    return tiny_module().pipeline()


def test_non_square_sizes_give_images_of_that_size(pipeline):
    assert pipeline.size_multiple == 16  # the demo's VAE (f=4) x its U-Net (two downsamplings)
    for height, width in ((32, 64), (48, 32)):
        images = pipeline(["a red circle on the left of a white background"], height=height, width=width, **SETTINGS)
        assert images.shape == (1, 3, height, width) and torch.isfinite(images).all()


@pytest.mark.parametrize(("height", "width"), [(40, 32), (32, 36), (0, 32)])
def test_a_size_the_factors_do_not_divide_is_refused_in_one_line_with_a_size_that_works(pipeline, height, width):
    with pytest.raises(ValueError, match=r"multiples of 16 \(the VAE's factor 4 x the network's 4\); e\.g\.") as error:
        pipeline(["x"], height=height, width=width, **SETTINGS)
    assert "\n" not in str(error.value)


def test_mixed_sizes_keep_each_image_what_a_call_at_its_size_alone_gives(pipeline):
    prompts = ["a", "b", "c"]
    images = pipeline.generate_at_sizes(prompts, [(32, 64), (32, 32), (32, 64)], seed=[5, 6, 7], **SETTINGS)
    assert [tuple(image.shape[1:]) for image in images] == [(32, 64), (32, 32), (32, 64)]
    assert torch.allclose(images[1], pipeline(["b"], height=32, width=32, seed=[6], **SETTINGS)[0], atol=1e-5)
    assert torch.allclose(images[2], pipeline(["c"], height=32, width=64, seed=[7], **SETTINGS)[0], atol=1e-5)
    with pytest.raises(ValueError, match="2 sizes given for 3 prompts"):
        pipeline.generate_at_sizes(prompts, [(32, 32)] * 2, **SETTINGS)


def test_the_sample_tool_writes_every_prompt_at_each_size_and_one_mixed_grid(tmp_path):
    from PIL import Image

    from ldm.tools.sample import main as sample_main

    module = tiny_module()
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "ldm_model_config": module.model_config}, checkpoint)
    paths = sample_main(["--model", str(checkpoint), "--prompt", "a", "--prompt", "b", "--size", "32x64",
                         "--size", "48x32", "--steps", "2", "--out-dir", str(tmp_path / "out")])
    assert [path.name for path in paths] == ["0000_a_32x64.png", "0001_b_32x64.png", "0002_a_48x32.png",
                                             "0003_b_48x32.png"]
    assert [Image.open(path).size for path in paths] == [(64, 32), (64, 32), (32, 48), (32, 48)]
    assert (tmp_path / "out" / "grid.png").is_file()
    with pytest.raises(ValueError, match="height=40 and width=32 must be positive multiples of 16"):
        sample_main(["--model", str(checkpoint), "--prompt", "a", "--size", "40x32", "--out-dir", str(tmp_path / "refused")])
