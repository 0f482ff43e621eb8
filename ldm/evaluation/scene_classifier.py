"""An offline feature extractor for the built-in data set: a small CNN that classifies each scene's facts.

FID needs features from a network that knows what matters in the images. No pretrained network can
be downloaded here, and Inception features of 32-pixel drawings of shapes say little anyway, so the
project trains its own: a 3-layer CNN that predicts the (colour, shape, background) of a built-in
image, trained on the built-in training split on first use (seconds on a CPU, seeded, so the same
weights every time) and cached under ``models/eval/`` with a hash of everything that made it. Its
penultimate activations are the FID/KID features. FID values are comparable only between runs
that used the same extractor file (the results JSON names it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ldm.checkpoints import load_weights, read_metadata, save_weights
from ldm.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, parse_caption

logger = logging.getLogger(__name__)

FACT_CLASSES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "shape": SHAPES, "background": tuple(BACKGROUNDS),
}


def pad_to_square(images: Tensor) -> Tensor:
    """Images (N, 3, H, W) extended to (N, 3, S, S), S = max(H, W), by repeating their edge pixels on both sides
    of the short one: a scene on a plain background stays undistorted (a resize to a square would squash it)."""
    height, width = images.shape[-2:]
    if height == width:
        return images
    extra_height, extra_width = max(width - height, 0), max(height - width, 0)
    padding = (extra_width // 2, extra_width - extra_width // 2, extra_height // 2, extra_height - extra_height // 2)
    return F.pad(images, padding, mode="replicate")


class SceneClassifier(nn.Module):
    """CNN over images (N, 3, H, W) in [0, 1]; ``forward`` gives features (N, num_features) (post-ReLU).

    Images are padded to a square (``pad_to_square``) and resized to ``resolution`` first, so any input size
    works. ``classify`` gives the
    logits of each fact (colour 6, shape 3, background 3).
    """

    def __init__(self, resolution: int = 32, width: int = 16, num_features: int = 64) -> None:
        super().__init__()
        if resolution % 8:
            raise ValueError(f"SceneClassifier resolution={resolution} must be a multiple of 8 (three 2x poolings)")
        self.resolution = resolution
        self.num_features = num_features

        def block(channels_in: int, channels_out: int) -> list[nn.Module]:
            return [nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out), nn.ReLU(),
                    nn.MaxPool2d(2)]

        # Flattening the 4x4 map rather than averaging it keeps the layout that tells shapes apart.
        self.body = nn.Sequential(
            *block(3, width), *block(width, 2 * width), *block(2 * width, 2 * width), nn.Flatten(),
            nn.Linear(2 * width * (resolution // 8) ** 2, num_features), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({fact: nn.Linear(num_features, len(classes)) for fact, classes in FACT_CLASSES.items()})
        # Set after training to the training images' feature mean and std, so that features come out
        # standardised and FID/KID values have a readable scale (the heads see raw activations).
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))

    def activations(self, images: Tensor) -> Tensor:
        """Penultimate activations (N, num_features) of images (N, 3, H, W) in [0, 1], not standardised."""
        images = pad_to_square(images.float())
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                   antialias=True, align_corners=False)
        return self.body(images * 2 - 1)

    def forward(self, images: Tensor) -> Tensor:
        return (self.activations(images) - self.feature_mean) / self.feature_std

    def classify(self, images: Tensor) -> dict[str, Tensor]:
        """Logits (N, classes) of each fact for images (N, 3, H, W) in [0, 1]."""
        features = self.activations(images)
        return {fact: head(features) for fact, head in self.heads.items()}


def fact_labels(captions: list[str]) -> dict[str, Tensor]:
    """Class indices (N,) of each fact, read from built-in captions."""
    parsed = [parse_caption(caption) for caption in captions]
    return {fact: torch.tensor([classes.index(p[fact]) for p in parsed]) for fact, classes in FACT_CLASSES.items()}


@torch.no_grad()
def fact_accuracy(model: SceneClassifier, images: Tensor, captions: list[str], batch_size: int = 256) -> dict[str, float]:
    """Fraction of images (N, 3, H, W) in [0, 1] whose colour, shape, background and all three are predicted right."""
    labels = fact_labels(captions)
    model.eval()
    hits = {fact: [] for fact in FACT_CLASSES}
    for start in range(0, len(images), batch_size):
        logits = model.classify(images[start : start + batch_size])
        for fact in FACT_CLASSES:
            hits[fact].append(logits[fact].argmax(1) == labels[fact][start : start + batch_size])
    correct = {fact: torch.cat(values) for fact, values in hits.items()}
    rates = {fact: float(values.float().mean()) for fact, values in correct.items()}
    rates["all"] = float(torch.stack(list(correct.values())).all(0).float().mean())
    return rates


def train_scene_classifier(
    images: Tensor, captions: list[str], steps: int = 400, batch_size: int = 64, lr: float = 3e-3,
    seed: int = 0, resolution: int = 32, width: int = 16, num_features: int = 64,
) -> SceneClassifier:
    """Fit a ``SceneClassifier`` to images (N, 3, H, W) in [0, 1] with built-in captions; seeded and deterministic."""
    # Callers may sit inside a no-grad or inference-mode block (e.g. a validation hook).
    with torch.inference_mode(False), torch.enable_grad():
        return _train(images.clone(), captions, steps, batch_size, lr, seed, resolution, width, num_features)


def _train(images: Tensor, captions: list[str], steps: int, batch_size: int, lr: float, seed: int,
           resolution: int, width: int, num_features: int) -> SceneClassifier:
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SceneClassifier(resolution=resolution, width=width, num_features=num_features)
    labels = fact_labels(captions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(images), (batch_size,), generator=generator)
        logits = model.classify(images[batch])
        loss = sum(F.cross_entropy(logits[fact], labels[fact][batch]) for fact in FACT_CLASSES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        activations = torch.cat([model.activations(images[i : i + 512]) for i in range(0, len(images), 512)])
    model.feature_mean.copy_(activations.mean(0))
    model.feature_std.copy_(activations.std(0).clamp_min(1e-3))  # dead units stay 0 rather than blow up
    return model


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def scene_classifier_features(
    train_shards: str,
    val_shards: str,
    cache_dir: str | Path,
    resolution: int = 32,
    steps: int = 250,
    seed: int = 0,
    num_features: int = 64,
    min_accuracy: float = 0.95,
    mixed_sizes: bool = False,
) -> SceneClassifier:
    """The cached scene classifier for these shards and settings, trained and checked on first use.

    ``mixed_sizes``: the shards hold images of several sizes (the multi-aspect set); each is read whole and
    brought to ``resolution`` x ``resolution`` as ``SceneClassifier`` brings what it is given (padded to a
    square, resized), rather than centre-cropped (a crop would cut the scene away from its caption).

    The cache file ``{cache_dir}/scene_classifier-{hash}.safetensors`` holds the weights and, in its
    metadata, the settings and the validation accuracy per fact. Training stops with an error if the
    classifier gets fewer than ``min_accuracy`` of the validation images fully right: its features
    would not describe the images.
    """
    from ldm.evaluation.reference import read_image_caption_set, read_images_by_size, shard_fingerprint

    def read(shards: str) -> tuple[Tensor, list[str]]:
        if not mixed_sizes:
            return read_image_caption_set(shards, resolution)
        groups = read_images_by_size(shards).values()
        images = [F.interpolate(pad_to_square(torch.stack(group)), size=(resolution, resolution), mode="bilinear",
                                antialias=True, align_corners=False) for group, _ in groups]
        return torch.cat(images), [caption for _, captions in groups for caption in captions]

    settings = dict(kind="scene_classifier", version=2, resolution=resolution, steps=steps, seed=seed,
                    num_features=num_features, train_shards=shard_fingerprint(train_shards))
    if mixed_sizes:
        settings["mixed_sizes"] = True
    path = Path(cache_dir) / f"scene_classifier-{_fingerprint(settings)}.safetensors"
    model = SceneClassifier(resolution=resolution, num_features=num_features)
    if path.is_file():
        load_weights(model, path)
        model.name = f"scene_classifier:{path.name}"
        model.val_accuracy = json.loads(read_metadata(path)["val_accuracy"])
        return model.eval()
    started = time.perf_counter()
    train_images, train_captions = read(train_shards)
    model = train_scene_classifier(train_images, train_captions, steps=steps, seed=seed,
                                   resolution=resolution, num_features=num_features)
    val_images, val_captions = read(val_shards)
    accuracy = fact_accuracy(model, val_images, val_captions)
    if accuracy["all"] < min_accuracy:
        raise RuntimeError(
            f"the scene classifier got only {accuracy['all']:.1%} of {len(val_images)} validation images fully "
            f"right ({accuracy}); its features would not describe the images. Raise steps (now {steps})"
        )
    save_weights(model, path, metadata=dict(settings=settings, val_accuracy=accuracy,
                                            num_val_images=len(val_images)))
    logger.info("Trained the scene classifier in %.1f s (validation accuracy %s), cached at %s",
                time.perf_counter() - started, accuracy, path)
    model.name = f"scene_classifier:{path.name}"
    model.val_accuracy = accuracy
    return model


def builtin_scene_classifier(synthetic: dict, cache_dir: str | Path, steps: int = 250, seed: int = 0,
                             num_features: int = 64, min_accuracy: float = 0.95) -> SceneClassifier:
    """``scene_classifier_features`` for the built-in set described by ``synthetic`` (the keyword
    arguments of ``ensure_synthetic_dataset``, as in ``configs/data/synthetic.yaml``), generated if missing.
    The multi-aspect set (``synthetic.sizes``) trains it on whole images of every size."""
    from ldm.data.synthetic import ensure_synthetic_dataset

    train_shards, val_shards = ensure_synthetic_dataset(**dict(synthetic))
    return scene_classifier_features(train_shards, val_shards, cache_dir, resolution=int(synthetic["resolution"]),
                                     steps=steps, seed=seed, num_features=num_features, min_accuracy=min_accuracy,
                                     mixed_sizes=synthetic.get("sizes") is not None)
