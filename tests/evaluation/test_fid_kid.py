"""FID and KID through torchmetrics on precomputed features: checked against a direct numpy/scipy formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from ldm.evaluation.metrics import PooledPixelFeatures, distribution_metrics, fid_from_features, kid_from_features
from ldm.evaluation.reference import extract_features


def scipy_frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), the textbook formula, in float64."""
    mu1, mu2 = real.mean(0), generated.mean(0)
    sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


def gaussian_features(n: int, dim: int, shift: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator) / dim**0.5
    return (torch.randn(n, dim, generator=generator) @ mixing + shift).double()


@pytest.mark.parametrize("shift", [0.0, 0.5, 3.0])
def test_fid_equals_scipy_frechet_distance_on_the_same_features(shift):
    real = gaussian_features(400, 24, 0.0, seed=1)
    generated = gaussian_features(300, 24, shift, seed=2)
    expected = scipy_frechet_distance(real.numpy(), generated.numpy())
    assert fid_from_features(real, generated) == pytest.approx(expected, abs=1e-3, rel=1e-6)


def test_fid_and_kid_of_a_set_against_itself_are_about_zero():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(300, 3, 16, 16, generator=generator)
    features = extract_features(PooledPixelFeatures(size=2), images)
    metrics = distribution_metrics(features, features, kid_subset_size=100, kid_subsets=10)
    assert abs(metrics["fid"]) < 1e-6
    assert abs(metrics["kid_mean"]) < 1e-3
    shifted = distribution_metrics(features, features + 0.5, kid_subset_size=100, kid_subsets=10)
    assert shifted["fid"] == pytest.approx(12 * 0.25, rel=1e-6)  # 12 features each moved by 0.5
    assert shifted["kid_mean"] > 100 * abs(metrics["kid_mean"])


def test_kid_is_seeded_and_uses_subsets_no_larger_than_the_sets():
    real, generated = gaussian_features(80, 8, 0.0, seed=3), gaussian_features(50, 8, 1.0, seed=4)
    first = kid_from_features(real, generated, subset_size=1000, subsets=20, seed=7)
    again = kid_from_features(real, generated, subset_size=1000, subsets=20, seed=7)
    other = kid_from_features(real, generated, subset_size=30, subsets=20, seed=8)
    assert first == again
    assert first[0] > 0 and other != first
