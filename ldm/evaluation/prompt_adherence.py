"""Whether generated images of the built-in data set show what their captions say, by pixel statistics."""

from __future__ import annotations

import itertools
from collections import defaultdict

from torch import Tensor

from ldm.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, caption_for, parse_caption
from ldm.evaluation.pixel_scene_classifier import classify_scene

FACTS = ("colour", "shape", "background")


def all_demo_captions() -> list[str]:
    """Every (shape, colour, background) caption of the built-in data set, in a fixed order."""
    return [caption_for(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, BACKGROUNDS)]


def adherence(images: Tensor, captions: list[str]) -> dict[str, list[bool]]:
    """For each fact and for "all" three, whether each image (N, 3, H, W) in [0, 1] shows what its caption says."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    hits: dict[str, list[bool]] = defaultdict(list)
    for image, caption in zip(images, captions):
        wanted = parse_caption(caption)
        seen = classify_scene(image)
        for fact in FACTS:
            hits[fact].append(seen[fact] == wanted[fact])
        hits["all"].append(all(seen[fact] == wanted[fact] for fact in FACTS))
    return hits


def hit_rate(values: list[bool]) -> float:
    """The fraction of True values (0 for none)."""
    return sum(values) / max(1, len(values))


def adherence_rates(images: Tensor, captions: list[str]) -> dict[str, float]:
    """The fraction of images (N, 3, H, W) in [0, 1] whose colour, shape, background and all three match."""
    return {fact: hit_rate(hits) for fact, hits in adherence(images, captions).items()}
