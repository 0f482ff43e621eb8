"""Memorization check: the nearest training image of every generated image, and the share that sit closer to
the training set than real held-out images ever do.

For each generated image, its nearest training image by Euclidean distance in two spaces: the evaluation
extractor's features and downsampled pixels. A threshold per space is calibrated on the real validation
images: ``threshold_ratio`` times the smallest distance from any validation image to its nearest training
image. A generated image is flagged when it is below the threshold in both spaces, so by construction no
validation image is flagged, and an exact copy of a training image (distance 0) always is. This follows the
nearest-neighbour copy detection of Carlini et al. 2023 ("Extracting Training Data from Diffusion Models",
sec. 4), with the threshold set from held-out data instead of fixed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def nearest_neighbours(queries: Tensor, keys: Tensor, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """For each row of ``queries`` (M, D): distance (M,) float64 to, and index (M,) of, its nearest row of ``keys`` (N, D)."""
    distances, indices = [], []
    keys = keys.double()
    for start in range(0, len(queries), batch_size):
        nearest = torch.cdist(queries[start : start + batch_size].double(), keys).min(dim=1)
        distances.append(nearest.values)
        indices.append(nearest.indices)
    return torch.cat(distances), torch.cat(indices)


@dataclass
class MemorizationResult:
    """Per generated image: nearest training index and distance in features and in pixels; the flags."""

    feature_distance: Tensor  # (M,) float64
    feature_index: Tensor  # (M,) int64
    pixel_distance: Tensor  # (M,) float64
    pixel_index: Tensor  # (M,) int64
    feature_threshold: float
    pixel_threshold: float
    flagged: Tensor  # (M,) bool
    validation_flagged: Tensor  # (V,) bool: the calibration set judged by the same rule

    def summary(self) -> dict[str, float | int]:
        """Shares and thresholds for results.json."""
        return {
            "share_flagged": float(self.flagged.double().mean()),
            "num_flagged": int(self.flagged.sum()),
            "share_below_feature_threshold": float((self.feature_distance < self.feature_threshold).double().mean()),
            "share_below_pixel_threshold": float((self.pixel_distance < self.pixel_threshold).double().mean()),
            "feature_threshold": self.feature_threshold,
            "pixel_threshold": self.pixel_threshold,
            "validation_share_flagged": float(self.validation_flagged.double().mean()),
            "median_feature_distance": float(self.feature_distance.median()),
            "median_pixel_distance": float(self.pixel_distance.median()),
        }


def memorization_check(generated_features: Tensor, generated_pixels: Tensor, train_features: Tensor,
                       train_pixels: Tensor, validation_features: Tensor, validation_pixels: Tensor,
                       threshold_ratio: float = 0.5) -> MemorizationResult:
    """Nearest training images of generated (M, D) / (M, P) rows and the copy flags, thresholds calibrated on
    validation rows (V, D) / (V, P); training rows are (N, D) / (N, P)."""
    if not 0 < threshold_ratio <= 1:
        raise ValueError(f"eval.memorization_threshold_ratio={threshold_ratio} must lie in (0, 1]")
    validation_feature, _ = nearest_neighbours(validation_features, train_features)
    validation_pixel, _ = nearest_neighbours(validation_pixels, train_pixels)
    feature_threshold = threshold_ratio * float(validation_feature.min())
    pixel_threshold = threshold_ratio * float(validation_pixel.min())
    feature_distance, feature_index = nearest_neighbours(generated_features, train_features)
    pixel_distance, pixel_index = nearest_neighbours(generated_pixels, train_pixels)
    flagged = (feature_distance < feature_threshold) & (pixel_distance < pixel_threshold)
    validation_flagged = (validation_feature < feature_threshold) & (validation_pixel < pixel_threshold)
    return MemorizationResult(feature_distance, feature_index, pixel_distance, pixel_index, feature_threshold,
                              pixel_threshold, flagged, validation_flagged)
