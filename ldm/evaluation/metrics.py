"""Distribution distances between real and generated images, through torchmetrics."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.image.fid import FrechetInceptionDistance


class PooledPixelFeatures(nn.Module):
    """Features (N, 3 * size * size): images (N, 3, H, W) in [0, 1] average-pooled to size x size.

    A feature extractor that needs no downloaded weights, for Frechet distances on small synthetic
    images whose content is colour and layout; it is no substitute for Inception features on photos.
    """

    def __init__(self, size: int = 4) -> None:
        super().__init__()
        self.size = size
        self.num_features = 3 * size * size

    def forward(self, images: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(images.float(), self.size).flatten(1)


def frechet_distance(real: Tensor, generated: Tensor, feature: nn.Module, batch_size: int = 256) -> float:
    """Frechet distance between Gaussian fits of ``feature`` of real and generated images (N, 3, H, W) in [0, 1]."""
    metric = FrechetInceptionDistance(feature=feature, normalize=True)
    with torch.no_grad():
        for images, is_real in ((real, True), (generated, False)):
            for start in range(0, len(images), batch_size):
                metric.update(images[start : start + batch_size], real=is_real)
    return float(metric.compute())
