"""Prompt adherence by pixel statistics and Frechet distance on pooled-pixel features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.data.synthetic import parse_caption, render_scene
from ldm.evaluation.metrics import PooledPixelFeatures, frechet_distance
from ldm.evaluation.prompt_adherence import adherence, adherence_rates, all_demo_captions


def rendered(captions: list[str]) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1] that show exactly what each caption says."""
    images = []
    for caption in captions:
        facts = parse_caption(caption)
        image = render_scene(facts["shape"], facts["colour"], facts["background"], size=0.6, centre=(0.5, 0.5))
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    return torch.stack(images)


def test_there_are_54_distinct_demo_captions():
    captions = all_demo_captions()
    assert len(captions) == len(set(captions)) == 54


def test_images_that_follow_their_captions_score_fully_and_swapped_ones_do_not():
    captions = all_demo_captions()
    images = rendered(captions)
    assert adherence_rates(images, captions) == {"colour": 1.0, "shape": 1.0, "background": 1.0, "all": 1.0}
    # Captions run over (shape, colour, background), background fastest: the next caption always has
    # another background; its colour differs where the background wraps (18 of 54), its shape where
    # colour and background both wrap (3 of 54).
    rates = adherence_rates(images, captions[1:] + captions[:1])
    assert rates == pytest.approx({"colour": 36 / 54, "shape": 51 / 54, "background": 0.0, "all": 0.0})
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        adherence(images[:3], captions[:2])


def test_frechet_distance_is_near_zero_for_one_distribution_and_large_between_two():
    generator = torch.Generator().manual_seed(0)
    dark = torch.rand(400, 3, 16, 16, generator=generator) * 0.5
    dark_too = torch.rand(400, 3, 16, 16, generator=generator) * 0.5
    bright = 0.5 + torch.rand(400, 3, 16, 16, generator=generator) * 0.5
    feature = PooledPixelFeatures(size=2)
    same = frechet_distance(dark, dark_too, feature)
    different = frechet_distance(dark, bright, feature)
    assert feature(dark).shape == (400, 12)
    assert 0 <= same < 0.01
    assert different > 12 * 0.25**2 * 0.9  # the mean shift alone: 12 features each moved by 0.25
