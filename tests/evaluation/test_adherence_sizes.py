"""Prompt adherence at non-square sizes: position words are scored, and only where a caption states one."""

from __future__ import annotations

import pytest
import torch

from ldm.evaluation.prompt_adherence import adherence, all_demo_captions, real_scenes_at, square_centre_crops


@pytest.mark.parametrize("size", [(32, 64), (48, 32)])
def test_real_scenes_at_a_size_follow_their_captions_and_a_mirror_swaps_the_position(size):
    images, captions = real_scenes_at(*size, count=54, seed=0)
    assert images.shape == (54, 3, *size)
    hits = adherence(images, captions)
    assert all(hits["position"]) and all(hits["all"]) and len(hits["position"]) == 54
    mirrored = images.flip(-1 if size[1] > size[0] else -2)  # the shape moves to the other half
    assert not any(adherence(mirrored, captions)["position"])


def test_square_captions_have_no_position_and_each_size_lists_its_own():
    assert len(all_demo_captions()) == 54 and all_demo_captions() == all_demo_captions(32, 32)
    assert {c.split(" of ")[0].split()[-1] for c in all_demo_captions(32, 64)} == {"left", "right"}
    assert {c.split(" of ")[0].split()[-1] for c in all_demo_captions(64, 32)} == {"top", "bottom"}
    hits = adherence(*real_scenes_at(32, 32, count=8, seed=0))
    assert "position" not in hits and all(hits["all"])


def test_a_centre_square_crop_cuts_the_scene():
    images, _ = real_scenes_at(32, 64, count=4, seed=0)
    crops = square_centre_crops(images)
    assert crops.shape == (4, 3, 32, 32)
    assert torch.equal(crops, images[..., 16:48])
