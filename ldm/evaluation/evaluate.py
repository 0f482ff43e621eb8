"""Generate images for a reference set's captions and score them: FID, KID, CLIP score, prompt adherence.

Used by ``eval.py`` (all processes of a job share the samples) and by the FID callback during training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ldm.data.synthetic import parse_caption
from ldm.evaluation.distributed import gather_in_order, sample_indices
from ldm.evaluation.metrics import PooledPixelFeatures, distribution_metrics
from ldm.evaluation.prompt_adherence import FACTS, POSITION, adherence
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
    pixel_size: int | None = None,
) -> dict[str, Any]:
    """Generate one image per caption (this rank's share), extract features, and gather them in sample order.

    Returns ``{"features": (N, D) float64, "adherence": {fact: [bool] * N} or None, "clip_score": float
    or None, "clip_per_sample": (N,) or None, "pixels": (N, 3 * pixel_size ** 2) downsampled images or None,
    "images": (keep_images, 3, H, W) of the first samples (rank 0's view), "seconds": float}``.
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
        # Position is scored where every caption states one (the multi-aspect set at a non-square size).
        facts = (*FACTS, *([POSITION] if all(POSITION in parse_caption(c) for c in captions) else []), "all")
        hits = adherence(images.cpu(), local_captions) if indices else {fact: [] for fact in facts}
        per_sample = gather_in_order(indices, [{fact: hits[fact][k] for fact in facts} for k in range(len(indices))])
        result["adherence"] = {fact: [sample[fact] for sample in per_sample] for fact in facts}
    result["clip_score"], result["clip_per_sample"] = None, None
    if clip_score is not None:
        local = per_sample_clip_scores(clip_score, images, local_captions, settings.batch_size) if indices else []
        per_sample = torch.tensor(gather_in_order(indices, local), dtype=torch.float64)
        result["clip_per_sample"] = per_sample
        result["clip_score"] = max(float(per_sample.mean()), 0.0)  # CLIPScore.compute's mean, clamped at 0
    result["pixels"] = None
    if pixel_size:
        local_pixels = PooledPixelFeatures(pixel_size)(images.cpu()).double() if indices else []
        result["pixels"] = torch.stack(gather_in_order(indices, local_pixels))
    kept = gather_in_order(indices[: keep_images], images[: len(indices[: keep_images])].cpu()) if keep_images else []
    result["images"] = torch.stack(kept[:keep_images]) if kept else torch.zeros(0, 3, settings.height, settings.width)
    result["seconds"] = time.perf_counter() - started
    return result


def per_sample_clip_scores(clip_score: Any, images: Tensor, captions: Sequence[str], batch_size: int) -> list[float]:
    """CLIP score (100 x cosine) of each image (N, 3, H, W) in [0, 1] with its caption, by the model and
    processor of a torchmetrics ``CLIPScore`` and the function its ``update`` calls."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    scores = []
    for start in range(0, len(captions), batch_size):
        score, _ = _clip_score_update(images[start : start + batch_size].cpu(), list(captions[start : start + batch_size]),
                                      clip_score.model, clip_score.processor)
        scores.extend(score.double().tolist())
    return scores


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
    pixel_size: int | None = None,
    analyse: Callable[[float, dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], dict[float, Tensor]]:
    """One row of metrics per guidance scale (fid, kid_mean, kid_std, clip_score, adherence_*, seconds, and
    what ``analyse(scale, scored)`` adds), and the first ``keep_images`` images of each scale."""
    rows, images = [], {}
    for scale in guidance_scales:
        scored = generate_and_score(pipeline, captions, float(scale), settings, feature_extractor, clip_score, keep_images,
                                    pixel_size)
        row: dict[str, Any] = {"guidance_scale": float(scale), "num_samples": len(captions)}
        row.update(distribution_metrics(real_features, scored["features"], kid_subset_size, kid_subsets, settings.seed))
        row["clip_score"] = scored["clip_score"]
        if scored["adherence"] is not None:
            row.update({f"adherence_{fact}": sum(hits) / len(hits) for fact, hits in scored["adherence"].items()})
        row["seconds"] = scored["seconds"]
        if analyse is not None:
            row.update(analyse(float(scale), scored))
        rows.append(row)
        images[float(scale)] = scored["images"]
        if on_row is not None:
            on_row(row)
    return rows, images


def size_sweep(
    pipeline: TextToImagePipeline,
    captions_by_size: dict[tuple[int, int], list[str]],
    real_by_size: dict[tuple[int, int], Tensor],
    guidance_scales: Sequence[float],
    settings: SamplingSettings,
    feature_extractor: nn.Module,
    clip_score: Any | None = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    keep_images: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]], dict[float, list[Tensor]]]:
    """Metrics at each image size (height, width) separately, and over all sizes together.

    For each size, ``guidance_sweep`` generates one image per caption of ``captions_by_size[size]`` at that
    size and scores it against ``real_by_size[size]`` (features (N, D) of real images of that size). Returns
    the overall rows (one per scale: FID/KID of all generated against all real features pooled, adherence and
    CLIP score over all samples), the rows of each size (``{"HxW": [row per scale]}``), and the first
    ``keep_images`` images (3, H, W) of each size, per scale.
    """
    scored_by_scale: dict[float, list[dict[str, Any]]] = {float(scale): [] for scale in guidance_scales}

    def keep_scored(scale: float, scored: dict[str, Any]) -> dict[str, Any]:
        scored_by_scale[scale].append(scored)
        return {}

    per_size, images = {}, {float(scale): [] for scale in guidance_scales}
    for (height, width), captions in captions_by_size.items():
        rows, kept = guidance_sweep(pipeline, captions, real_by_size[(height, width)], guidance_scales,
                                    replace(settings, height=height, width=width), feature_extractor, clip_score,
                                    kid_subset_size, kid_subsets, keep_images=keep_images, analyse=keep_scored)
        per_size[f"{height}x{width}"] = rows
        for scale, scale_images in kept.items():
            images[scale].extend(scale_images)
    overall = []
    for scale, scored_sizes in scored_by_scale.items():
        row: dict[str, Any] = {"guidance_scale": scale, "num_samples": sum(len(c) for c in captions_by_size.values())}
        row.update(distribution_metrics(torch.cat(list(real_by_size.values())),
                                        torch.cat([scored["features"] for scored in scored_sizes]),
                                        kid_subset_size, kid_subsets, settings.seed))
        clip_scores = [scored["clip_per_sample"] for scored in scored_sizes if scored["clip_per_sample"] is not None]
        row["clip_score"] = max(float(torch.cat(clip_scores).mean()), 0.0) if clip_scores else None
        hits: dict[str, list[bool]] = {}
        for scored in scored_sizes:
            for fact, values in (scored["adherence"] or {}).items():
                hits.setdefault(fact, []).extend(values)
        row.update({f"adherence_{fact}": sum(values) / len(values) for fact, values in hits.items()})
        row["seconds"] = sum(scored["seconds"] for scored in scored_sizes)
        overall.append(row)
    return overall, per_size, images
