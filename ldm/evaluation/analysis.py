"""What ``eval.py`` adds to each guidance scale's metrics: bootstrap intervals, precision/recall/density/coverage,
the memorization check, and a paired comparison with a second model on the same captions and seeds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ldm.evaluation.evaluate import SamplingSettings, generate_and_score
from ldm.evaluation.manifold import precision_recall_density_coverage
from ldm.evaluation.memorization import MemorizationResult, memorization_check
from ldm.evaluation.options import EvalOptions
from ldm.evaluation.uncertainty import MetricSet, SampleScores, bootstrap_intervals, paired_comparison
from ldm.pipeline import TextToImagePipeline
from ldm.visualization import captioned_grid, to_pil_images


@dataclass
class MemorizationSets:
    """Training images (N, 3, H, W) in [0, 1] with their features (N, D) and downsampled pixels (N, P), and the
    validation (reference) images' downsampled pixels (V, P), whose features are the reference features."""

    train_images: Tensor
    train_captions: list[str]
    train_features: Tensor
    train_pixels: Tensor
    validation_pixels: Tensor


def sample_scores(scored: dict[str, Any]) -> SampleScores:
    """The per-sample results of ``generate_and_score`` as ``SampleScores``."""
    adherence = scored.get("adherence")
    hits = torch.tensor(adherence["all"], dtype=torch.float64) if adherence is not None else None
    return SampleScores(scored["features"].double(), scored.get("clip_per_sample"), hits)


@dataclass
class SampleAnalysis:
    """Called by ``guidance_sweep`` with each scale's per-sample results; returns the fields it adds to the row."""

    real: Tensor
    options: EvalOptions
    settings: SamplingSettings
    captions: list[str]
    feature_extractor: Any
    clip_score: Any = None
    memorization_sets: MemorizationSets | None = None
    compare_pipeline: TextToImagePipeline | None = None
    memorization_results: dict[float, MemorizationResult] = field(default_factory=dict)

    def metric_set(self) -> MetricSet:
        return MetricSet(self.real, self.options.kid_subset_size, kid_subsets=10)

    def __call__(self, scale: float, scored: dict[str, Any]) -> dict[str, Any]:
        options = self.options
        extra: dict[str, Any] = precision_recall_density_coverage(self.real, scored["features"], options.prdc_k)
        scores = sample_scores(scored)
        if options.bootstrap_resamples:
            extra["intervals"] = {"confidence": options.confidence, **bootstrap_intervals(
                self.metric_set(), scores, options.bootstrap_resamples, options.confidence, seed=self.settings.seed)}
        if self.memorization_sets is not None:
            sets = self.memorization_sets
            result = memorization_check(scored["features"], scored["pixels"], sets.train_features, sets.train_pixels,
                                        self.real, sets.validation_pixels, options.memorization_threshold_ratio)
            self.memorization_results[scale] = result
            extra["memorization"] = {**result.summary(), "num_train": len(sets.train_features),
                                     "pixel_size": options.memorization_pixel_size}
            extra["memorization_share_flagged"] = extra["memorization"]["share_flagged"]
        if self.compare_pipeline is not None:
            other = generate_and_score(self.compare_pipeline, self.captions, scale, self.settings, self.feature_extractor,
                                       self.clip_score)
            resamples = max(options.bootstrap_resamples, 2)
            extra["comparison"] = {"confidence": options.confidence, **paired_comparison(
                self.metric_set(), scores, sample_scores(other), resamples, options.confidence, seed=self.settings.seed)}
        return extra


def memorization_grid(pipeline: TextToImagePipeline, result: MemorizationResult, sets: MemorizationSets,
                      captions: list[str], scale: float, settings: SamplingSettings, num_pairs: int) -> Image.Image:
    """The ``num_pairs`` generated images closest to a training image (in pixels), each beside that training
    image; generated images are made again from their caption and seed (image i: seed + i)."""
    order = torch.argsort(result.pixel_distance)[:num_pairs].tolist()
    generated = pipeline([captions[i] for i in order], height=settings.height, width=settings.width,
                         num_inference_steps=settings.num_inference_steps, guidance_scale=scale,
                         sampler=settings.sampler, seed=[settings.seed + i for i in order],
                         batch_size=settings.batch_size, **settings.sampler_options).cpu()
    tiles, labels = [], []
    for position, i in enumerate(order):
        j = int(result.pixel_index[i])
        flag = " COPY" if bool(result.flagged[i]) else ""
        tiles += [generated[position], sets.train_images[j]]
        labels += [f"generated {i}: d_pix={float(result.pixel_distance[i]):.3f}{flag}", f"train {j}: {sets.train_captions[j]}"]
    return captioned_grid(to_pil_images(torch.stack(tiles)), labels, columns=6)
