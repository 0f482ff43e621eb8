"""Feature extractors: the offline scene classifier (trained, checked, cached, deterministic) and Inception's config path."""

from __future__ import annotations

import pytest
import torch

from ldm.data.synthetic import ensure_synthetic_dataset
from ldm.evaluation.metrics import InceptionFeatures
from ldm.evaluation.reference import read_image_caption_set, reference_features
from ldm.evaluation.scene_classifier import (
    SceneClassifier, fact_accuracy, scene_classifier_features, train_scene_classifier)

SMALL_SET = dict(num_train=1024, num_val=128, samples_per_shard=256, resolution=32, seed=0)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data"), **SMALL_SET)


@pytest.fixture(scope="module")
def classifier(small_set, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    train, val = small_set
    return scene_classifier_features(train, val, cache, steps=120, min_accuracy=0.9), cache


def test_scene_classifier_learns_the_facts_and_reports_its_validation_accuracy(classifier, small_set):
    model, _ = classifier
    images, captions = read_image_caption_set(small_set[1], 32)
    accuracy = fact_accuracy(model, images, captions)
    assert accuracy == model.val_accuracy
    assert accuracy["all"] >= 0.9
    # The features tell facts apart: swapping each caption for another scene's drops accuracy to chance-ish.
    assert fact_accuracy(model, images, captions[1:] + captions[:1])["all"] < 0.3
    features = model(images)
    assert features.shape == (len(images), model.num_features)


def test_scene_classifier_is_cached_and_deterministic(classifier, small_set, tmp_path):
    model, cache = classifier
    train, val = small_set
    (cached_file,) = cache.glob("scene_classifier-*.safetensors")
    assert model.name == f"scene_classifier:{cached_file.name}"
    reloaded = scene_classifier_features(train, val, cache, steps=120, min_accuracy=0.9)
    images = torch.rand(8, 3, 32, 32)
    assert torch.equal(reloaded(images), model(images))
    subset, captions = read_image_caption_set(train, 32, limit=128)
    first, second = (train_scene_classifier(subset, captions, steps=5, seed=3) for _ in range(2))
    assert torch.equal(first(images), second(images))
    assert not torch.equal(train_scene_classifier(subset, captions, steps=5, seed=4)(images), first(images))


def test_scene_classifier_refuses_to_serve_features_when_it_did_not_learn(small_set, tmp_path):
    train, val = small_set
    with pytest.raises(RuntimeError, match="validation images fully right"):
        scene_classifier_features(train, val, tmp_path, steps=2, min_accuracy=0.9)
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ValueError, match="multiple of 8"):
        SceneClassifier(resolution=20)


def test_reference_features_are_computed_once_and_read_back(classifier, small_set, tmp_path):
    model, _ = classifier
    calls = []

    def counting(images):
        calls.append(len(images))
        return model(images)

    first, captions, path = reference_features(small_set[1], 32, counting, model.name, tmp_path, limit=64)
    second, captions_again, path_again = reference_features(small_set[1], 32, counting, model.name, tmp_path, limit=64)
    assert calls == [64] and path == path_again and path.is_file()
    assert torch.equal(first, second) and captions == captions_again and len(captions) == 64
    _, _, other = reference_features(small_set[1], 32, counting, "another extractor", tmp_path, limit=64)
    assert other != path and calls == [64, 64]


def test_inception_weights_path_is_checked_and_a_wrong_file_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.feature_extractor.weights_path=.*does not exist"):
        InceptionFeatures(weights_path=str(tmp_path / "missing.pth"))
    fake = tmp_path / "fake_inception.pth"
    torch.save({"conv.weight": torch.zeros(1)}, fake)
    # Without torch-fidelity: an ImportError naming the fix; with it: the fake weights are refused by name.
    with pytest.raises((ImportError, ValueError), match="torch-fidelity|weights_path="):
        InceptionFeatures(weights_path=str(fake))


@pytest.mark.slow
def test_scene_classifier_of_the_multi_aspect_set_learns_from_whole_images_of_every_size(tmp_path):
    """Trained on whole 32x32, 32x64 and 64x32 images padded to a square and resized to 48 px (as
    data=synthetic_buckets builds it, default 250 steps; not centre crops that cut the shape away): the
    95 % of validation images fully right that eval.py requires of any extractor it uses."""
    train, val = ensure_synthetic_dataset(tmp_path / "data", num_train=1024, num_val=128, samples_per_shard=256,
                                          sizes=[[32, 32], [32, 64], [64, 32]])
    model = scene_classifier_features(train, val, tmp_path / "cache", resolution=48, mixed_sizes=True)
    assert model.val_accuracy["all"] >= 0.95
    wide = torch.rand(2, 3, 32, 64)
    assert model(wide).shape == (2, model.num_features)
    assert list(tmp_path.glob("cache/scene_classifier-*.safetensors"))
