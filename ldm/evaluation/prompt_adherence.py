"""Whether generated images of the built-in data set show what their captions say, by pixel statistics."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence

from torch import Tensor

import numpy as np
import torch

from ldm.data.synthetic import (BACKGROUNDS, COLOURS, SHAPES, caption_for, parse_caption, positions_for, render_scene,
                                sample_multi_aspect_facts)
from ldm.evaluation.pixel_scene_classifier import classify_scene

FACTS = ("colour", "shape", "background")
# Stated only by the multi-aspect set's captions of non-square images: scored where a caption has it.
POSITION = "position"


def all_demo_captions(height: int | None = None, width: int | None = None) -> list[str]:
    """Every (shape, colour, background) caption of the built-in data set, in a fixed order; given a non-square
    ``height`` x ``width``, every caption of the multi-aspect set at that size (each position in turn)."""
    positions = positions_for(height, width) if height is not None and width is not None else ()
    return [caption_for(s, c, b, p) for s, c, b in itertools.product(SHAPES, COLOURS, BACKGROUNDS)
            for p in (positions or (None,))]


def real_scenes_at(height: int, width: int, count: int, seed: int) -> tuple[Tensor, list[str]]:
    """``count`` scenes (N, 3, height, width) in [0, 1] drawn by the data set's generator at this size (the
    multi-aspect set's facts, its captions), to check the classifier on real images of that size."""
    facts = sample_multi_aspect_facts(count, seed, [(height, width)], split="adherence-check")
    images, captions = [], []
    for scene in facts:
        position = scene.pop("position")
        scene.pop("height"), scene.pop("width")
        image = render_scene(resolution=(height, width), **scene)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
        captions.append(caption_for(scene["shape"], scene["colour"], scene["background"], position))
    return torch.stack(images), captions


def square_centre_crops(images: Tensor) -> Tensor:
    """The centre square of the short side of images (N, 3, H, W): what a square pipeline trains on."""
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return images[..., top : top + side, left : left + side]


def adherence(images: Tensor | Sequence[Tensor], captions: list[str]) -> dict[str, list[bool]]:
    """For each fact and for "all" of them, whether each image (N, 3, H, W) in [0, 1] (or a list of
    (3, H, W) images of any sizes) shows what its caption says. ``"position"`` is scored only for
    captions that state one (its list is shorter then), and counts in ``"all"`` where stated."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    hits: dict[str, list[bool]] = defaultdict(list)
    for image, caption in zip(images, captions):
        wanted = parse_caption(caption)
        seen = classify_scene(image)
        for fact in FACTS:
            hits[fact].append(seen[fact] == wanted[fact])
        if POSITION in wanted:
            hits[POSITION].append(seen.get(POSITION) == wanted[POSITION])
        hits["all"].append(all(seen.get(fact) == wanted[fact] for fact in wanted))
    return hits


def hit_rate(values: list[bool]) -> float:
    """The fraction of True values (0 for none)."""
    return sum(values) / max(1, len(values))


def adherence_rates(images: Tensor, captions: list[str]) -> dict[str, float]:
    """The fraction of images (N, 3, H, W) in [0, 1] whose colour, shape, background and all three match."""
    return {fact: hit_rate(hits) for fact, hits in adherence(images, captions).items()}
