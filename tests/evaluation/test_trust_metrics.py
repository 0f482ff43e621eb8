"""Precision/recall, density/coverage, bootstrap intervals, paired comparisons and the memorization check on
features whose answer is known."""

from __future__ import annotations

import pytest
import torch

from ldm.data.synthetic import write_synthetic_shards
from ldm.evaluation.manifold import knn_radii, precision_recall_density_coverage
from ldm.evaluation.memorization import memorization_check
from ldm.evaluation.metrics import PooledPixelFeatures
from ldm.evaluation.reference import extract_features, read_image_caption_set
from ldm.evaluation.uncertainty import MetricSet, SampleScores, bootstrap_intervals, paired_comparison


def gaussian(n: int, seed: int, shift: float = 0.0, scale: float = 1.0, dim: int = 8) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


def test_knn_radius_is_the_distance_to_the_kth_other_point():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(points, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(points, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_real_against_real_scores_near_one_and_disjoint_sets_zero():
    same = precision_recall_density_coverage(gaussian(500, 0), gaussian(500, 1), k=5)
    # Two samples of one distribution: each lies in the other's k-NN manifold almost everywhere.
    assert same["precision"] > 0.85 and same["recall"] > 0.85 and same["coverage"] > 0.85
    assert 0.8 < same["density"] < 1.2
    apart = precision_recall_density_coverage(gaussian(300, 0), gaussian(300, 1, shift=20.0), k=5)
    assert apart == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_collapsed_generator_has_precision_but_no_recall():
    real = gaussian(400, 0)
    collapsed = gaussian(400, 1, scale=0.05)  # every sample near the real mode
    scores = precision_recall_density_coverage(real, collapsed, k=5)
    assert scores["precision"] > 0.95 and scores["recall"] < 0.1 and scores["coverage"] < 0.2
    assert scores["density"] > 2  # crowding the densest region


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_samples():
    real = gaussian(2000, 0)
    metrics = MetricSet(real, kid_subset_size=100, kid_subsets=2)
    widths = []
    for n in (100, 400):
        generated = SampleScores(gaussian(n, 1, shift=0.3), clip=torch.rand(n, dtype=torch.float64) * 30,
                                 adherence=(torch.rand(n) < 0.7).double())
        point = metrics(generated, torch.Generator().manual_seed(0))
        interval = bootstrap_intervals(metrics, generated, num_resamples=60, seed=0)
        assert set(interval) == {"fid", "kid_mean", "clip_score", "adherence_all"}
        for name in ("clip_score", "adherence_all"):  # unbiased means: the point estimate lies inside
            assert interval[name]["low"] <= point[name] <= interval[name]["high"], name
        widths.append(interval["fid"]["high"] - interval["fid"]["low"])
    assert widths[1] < 0.75 * widths[0]  # 1/sqrt(n) predicts 0.5; leave room for resampling noise at 60 draws


def test_paired_comparison_of_a_set_with_itself_and_with_a_worse_one():
    real = gaussian(600, 0)
    metrics = MetricSet(real, kid_subset_size=100, kid_subsets=2)
    good = SampleScores(gaussian(200, 1), clip=torch.full((200,), 25.0, dtype=torch.float64))
    bad = SampleScores(gaussian(200, 2, shift=1.0), clip=torch.full((200,), 20.0, dtype=torch.float64))
    itself = paired_comparison(metrics, good, good, num_resamples=100, seed=0)
    assert itself["fid"]["difference"] == 0.0 and itself["fid"]["p_value"] == 1.0
    versus = paired_comparison(metrics, good, bad, num_resamples=100, seed=0)
    assert versus["fid"]["difference"] < 0 and versus["fid"]["high"] < 0
    assert versus["fid"]["p_value"] < 0.02 and versus["clip_score"]["p_value"] < 0.02  # 1/101: no permutation as extreme
    with pytest.raises(ValueError, match="as many samples"):
        paired_comparison(metrics, good, good.take(torch.arange(10)), num_resamples=10)


def test_memorization_check_flags_every_planted_training_image_and_no_validation_image(tmp_path):
    """Generated set = real held-out-like images with 8 training images planted in it."""
    train_shards = write_synthetic_shards(tmp_path / "train", 512, 256, 32, seed=0, split="train")
    val_shards = write_synthetic_shards(tmp_path / "val", 128, 128, 32, seed=0, split="val")
    train, _ = read_image_caption_set([str(p) for p in train_shards], 32)
    validation, _ = read_image_caption_set([str(p) for p in val_shards], 32)
    features, pixels = PooledPixelFeatures(4), PooledPixelFeatures(8)
    planted = torch.arange(0, 512, 64)
    generated = torch.cat([validation[:40], train[planted]])  # held-out images stand in for novel samples
    result = memorization_check(extract_features(features, generated), extract_features(pixels, generated),
                                extract_features(features, train), extract_features(pixels, train),
                                extract_features(features, validation[40:]), extract_features(pixels, validation[40:]))
    assert result.flagged[40:].all() and torch.equal(result.pixel_index[40:], planted)
    assert not result.validation_flagged.any()
    assert not result.flagged[:40].any()  # the same kind of held-out images, not used to calibrate
    assert result.summary()["num_flagged"] == len(planted)
