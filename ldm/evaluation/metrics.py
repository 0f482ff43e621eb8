"""Distribution distances between real and generated images (FID, KID) through torchmetrics, on any features.

Features are extracted once per image (``ldm.evaluation.reference.extract_features``) and handed to
torchmetrics' FID and KID through ``PrecomputedFeatures``, so the two metrics share one extractor
pass, reference features can be cached, and features gathered from several processes are combined
in sample order (which makes results independent of the number of processes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance


class PooledPixelFeatures(nn.Module):
    """Features (N, 3 * size * size): images (N, 3, H, W) in [0, 1] average-pooled to size x size.

    A feature extractor that needs no downloaded weights, for Frechet distances on small synthetic
    images whose content is colour and layout; it is no substitute for Inception features on photos.
    """

    def __init__(self, size: int = 4) -> None:
        super().__init__()
        self.size = size
        self.num_features = 3 * size * size
        self.name = f"pooled_pixels_{size}x{size}"

    def forward(self, images: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(images.float(), self.size).flatten(1)


class InceptionFeatures(nn.Module):
    """torchmetrics' FID InceptionV3 (torch-fidelity's port of the TF graph): images (N, 3, H, W) in [0, 1]
    -> pool features (N, 2048), exactly as ``FrechetInceptionDistance(normalize=True)`` feeds it.

    ``weights_path``: a local copy of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` for
    machines without internet; None downloads it on first use.
    """

    def __init__(self, weights_path: str | None = None, num_features: int = 2048) -> None:
        super().__init__()
        if weights_path is not None:
            from pathlib import Path

            if not Path(weights_path).is_file():
                raise FileNotFoundError(
                    f"eval.feature_extractor.weights_path={weights_path} does not exist; copy torch-fidelity's "
                    f"weights-inception-2015-12-05-6726825d.pth there, or set it to null to download it"
                )
        try:
            self.inception = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=[str(num_features)], feature_extractor_weights_path=weights_path
            )
        except ModuleNotFoundError as error:
            raise ImportError(
                "the InceptionV3 feature extractor needs torch-fidelity: pip install 'ldm[inception]' (or "
                "torch-fidelity); without it use eval/feature_extractor=scene_classifier or pooled_pixels"
            ) from error
        except (RuntimeError, KeyError, ValueError, OSError) as error:
            raise ValueError(
                f"eval.feature_extractor.weights_path={weights_path} could not be loaded into torch-fidelity's "
                f"InceptionV3 ({error}); it must be weights-inception-2015-12-05-6726825d.pth"
            ) from error
        self.num_features = num_features
        self.name = f"inception-v3-compat-{num_features} (torchmetrics/torch-fidelity)"

    def forward(self, images: Tensor) -> Tensor:
        return self.inception((images.clamp(0, 1) * 255).byte())


class PrecomputedFeatures(nn.Module):
    """Pass-through "extractor" so torchmetrics' FID/KID accept features (N, num_features) already extracted."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features (N, {self.num_features}), got {tuple(features.shape)}")
        return features


def fid_from_features(real: Tensor, generated: Tensor) -> float:
    """FID between features (N, D) and (M, D) with torchmetrics, in float64, without syncing processes."""
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(generated.double(), real=False)
    return float(metric.compute())


def kid_from_features(real: Tensor, generated: Tensor, subset_size: int = 1000, subsets: int = 100,
                      seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets of ``min(subset_size, N, M)``), seeded, no process sync."""
    size = min(subset_size, len(real), len(generated))
    metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subset_size=size,
                                     subsets=subsets, sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(generated.double(), real=False)
    # torchmetrics draws the subsets from the global generator: fork it so the result is seeded.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def distribution_metrics(real: Tensor, generated: Tensor, kid_subset_size: int = 1000, kid_subsets: int = 100,
                         seed: int = 0) -> dict[str, float]:
    """``{"fid", "kid_mean", "kid_std"}`` between real and generated features (N, D), (M, D)."""
    kid_mean, kid_std = kid_from_features(real, generated, kid_subset_size, kid_subsets, seed)
    return {"fid": fid_from_features(real, generated), "kid_mean": kid_mean, "kid_std": kid_std}


@torch.no_grad()
def frechet_distance(real: Tensor, generated: Tensor, feature: nn.Module, batch_size: int = 256) -> float:
    """Frechet distance between Gaussian fits of ``feature`` of real and generated images (N, 3, H, W) in [0, 1]."""
    from ldm.evaluation.reference import extract_features

    return fid_from_features(extract_features(feature, real, batch_size), extract_features(feature, generated, batch_size))
