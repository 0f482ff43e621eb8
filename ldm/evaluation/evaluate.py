"""Generate images for a reference set's captions and score them: FID, KID, CLIP score, prompt adherence.

Used by ``eval.py`` (all processes of a job share the samples) and by the FID callback during training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ldm.data.synthetic import parse_caption
from ldm.evaluation.distributed import gather_in_order, sample_indices
from ldm.evaluation.metrics import distribution_metrics
from ldm.evaluation.prompt_adherence import FACTS, adherence
from ldm.evaluation.reference import extract_features
from ldm.pipeline import TextToImagePipeline
from ldm.ranks import rank_and_world_size


@dataclass
class SamplingSettings:
    """How evaluation images are generated: image i uses seed ``seed + i`` whatever the process count."""

    sampler: str | None = None
    num_inference_steps: int = 50
    seed: int = 0
    batch_size: int = 64
    height: int = 32
    width: int = 32
    sampler_options: dict[str, Any] = field(default_factory=dict)


def are_builtin_captions(captions: Sequence[str]) -> bool:
    """Whether every caption is one of the built-in data set's (so prompt adherence can be measured)."""
    try:
        for caption in captions:
            parse_caption(caption)
    except ValueError:
        return False
    return True


@torch.no_grad()
def generate_and_score(
    pipeline: TextToImagePipeline,
    captions: Sequence[str],
    guidance_scale: float,
    settings: SamplingSettings,
    feature_extractor: nn.Module,
    clip_score: Any | None = None,
    keep_images: int = 0,
) -> dict[str, Any]:
    """Generate one image per caption (this rank's share), extract features, and gather them in sample order.

    Returns ``{"features": (N, D) float64, "adherence": {fact: [bool] * N} or None, "clip_score": float
    or None, "images": (keep_images, 3, H, W) of the first samples (rank 0's view), "seconds": float}``.
    Every process must call this with the same arguments (CLIP score and the gathers are collective).
    """
    rank, world_size = rank_and_world_size(from_launcher=False)
    indices = sample_indices(len(captions), rank, world_size)
    local_captions = [captions[i] for i in indices]
    started = time.perf_counter()
    images = pipeline(
        local_captions, height=settings.height, width=settings.width, num_inference_steps=settings.num_inference_steps,
        guidance_scale=guidance_scale, sampler=settings.sampler, seed=[settings.seed + i for i in indices],
        batch_size=settings.batch_size, **settings.sampler_options,
    ) if indices else torch.zeros(0, 3, settings.height, settings.width)
    features = extract_features(feature_extractor, images) if indices else torch.zeros(0, feature_extractor.num_features)
    result: dict[str, Any] = {"features": torch.stack(gather_in_order(indices, features))}
    result["adherence"] = None
    if are_builtin_captions(captions):
        hits = adherence(images.cpu(), local_captions) if indices else {fact: [] for fact in (*FACTS, "all")}
        per_sample = gather_in_order(indices, [{fact: hits[fact][k] for fact in hits} for k in range(len(indices))])
        result["adherence"] = {fact: [sample[fact] for sample in per_sample] for fact in (*FACTS, "all")}
    result["clip_score"] = None
    if clip_score is not None:
        clip_score.reset()
        if indices:
            for start in range(0, len(indices), settings.batch_size):
                clip_score.update(images[start : start + settings.batch_size].cpu(),
                                  local_captions[start : start + settings.batch_size])
        result["clip_score"] = float(clip_score.compute())  # torchmetrics sums score and count over processes
    kept = gather_in_order(indices[: keep_images], images[: len(indices[: keep_images])].cpu()) if keep_images else []
    result["images"] = torch.stack(kept[:keep_images]) if kept else torch.zeros(0, 3, settings.height, settings.width)
    result["seconds"] = time.perf_counter() - started
    return result


def guidance_sweep(
    pipeline: TextToImagePipeline,
    captions: Sequence[str],
    real_features: Tensor,
    guidance_scales: Sequence[float],
    settings: SamplingSettings,
    feature_extractor: nn.Module,
    clip_score: Any | None = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    keep_images: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[float, Tensor]]:
    """One row of metrics per guidance scale (fid, kid_mean, kid_std, clip_score, adherence_*, seconds),
    and the first ``keep_images`` images of each scale."""
    rows, images = [], {}
    for scale in guidance_scales:
        scored = generate_and_score(pipeline, captions, float(scale), settings, feature_extractor, clip_score, keep_images)
        row: dict[str, Any] = {"guidance_scale": float(scale), "num_samples": len(captions)}
        row.update(distribution_metrics(real_features, scored["features"], kid_subset_size, kid_subsets, settings.seed))
        row["clip_score"] = scored["clip_score"]
        if scored["adherence"] is not None:
            row.update({f"adherence_{fact}": sum(hits) / len(hits) for fact, hits in scored["adherence"].items()})
        row["seconds"] = scored["seconds"]
        rows.append(row)
        images[float(scale)] = scored["images"]
        if on_row is not None:
            on_row(row)
    return rows, images
