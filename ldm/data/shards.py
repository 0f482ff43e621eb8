"""Image-caption samples of WebDataset shards: ``image_text_dataset`` builds the stream (``ldm.data.stream``) whose
samples are decoded images (JPEG draft, bucket, resize, crop, flip) with their captions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ldm.data.buckets import BUCKET_CROPS, Bucket, nearest_bucket
from ldm.data.filters import MetadataFilters
from ldm.data.skips import SkipCounter
from ldm.data.stream import ShardStream
from ldm.data.transforms import decode_rgb, open_image, resize_and_crop, to_tensor

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ImageTextDataset(ShardStream):
    """Image-caption samples from WebDataset shards; see ``image_text_dataset``."""

    def __init__(self, shards, resolution: int, train: bool, mode: str | None = None, random_crop: bool = True,
                 random_flip: bool = False, keep_metadata: bool = False, buckets: Sequence[Bucket] | None = None,
                 bucket_crop: str = "random", **stream_options) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution={resolution} must be a positive number of pixels, e.g. 256")
        if bucket_crop not in BUCKET_CROPS:
            raise ValueError(f"bucket_crop={bucket_crop!r} is unknown; choose one of {BUCKET_CROPS}")
        if buckets is not None and len(buckets) == 0:
            raise ValueError("buckets=[] is empty: give at least one (height, width), or None for square crops")
        mode = mode or ("resampled" if train else "exactly_once")
        super().__init__(shards, mode, augment=train, **stream_options)
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.keep_metadata = keep_metadata
        self.buckets = [tuple(bucket) for bucket in buckets] if buckets is not None else None
        self.bucket_crop = bucket_crop

    def decode(self, raw: dict, metadata: dict, rng: np.random.Generator | None, counter: SkipCounter) -> dict | None:
        """Image bytes -> ``{"image", "original_size", "crop_coords", "target_size"}``; ``rng`` given: random
        crop (square: ``random_crop``; buckets: ``bucket_crop``) and flip."""
        url = raw["__url__"]
        where = f"{url} {raw['__key__']}"
        extension = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if extension is None:
            counter.add("missing_image", f"{where} has no {'/'.join(IMAGE_EXTENSIONS)} file", shard=url)
            return None
        try:
            with open_image(raw[extension]) as image:
                if self.filters.needs_image_size(metadata) and self.filters.rejects_size(*image.size):
                    counter.add("filtered_size", where, shard=url)
                    return None
                original_size = (image.height, image.width)
                if self.buckets is None:
                    target_size, random_crop = (self.resolution, self.resolution), self.random_crop
                else:
                    target_size = self.buckets[nearest_bucket(image.height, image.width, self.buckets)]
                    random_crop = self.bucket_crop == "random"
                image = decode_rgb(image, target_size)
        except Exception as error:  # PIL raises many types for corrupt or truncated files
            counter.add("corrupt_image", f"{where}: {type(error).__name__}: {error}", shard=url)
            return None
        image, crop_coords = resize_and_crop(image, target_size, rng if random_crop else None)
        flip = rng is not None and self.random_flip and rng.random() < 0.5
        sample = {
            "image": to_tensor(image, flip=flip),
            "original_size": torch.tensor(original_size, dtype=torch.long),
            "crop_coords": torch.tensor(crop_coords, dtype=torch.long),
            "target_size": torch.tensor(target_size, dtype=torch.long),
        }
        if self.keep_metadata:  # for tools that rewrite the shards (precompute_latents)
            sample["json"] = metadata
        return sample


def image_text_dataset(
    shards: str | Sequence[str] | Sequence[Sequence[str]],
    resolution: int,
    train: bool,
    caption_dropout_prob: float = 0.0,
    shuffle_buffer: int = 1000,
    epoch_length: int | None = None,
    seed: int = 0,
    skip_counter: SkipCounter | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    *,
    mode: str | None = None,
    source_weights: Sequence[float] | None = None,
    filters: MetadataFilters | None = None,
    random_crop: bool = True,
    random_flip: bool = False,
    max_skip_rate: float | None = None,
    skip_rate_min_samples: int = 1000,
    buckets: Sequence[Bucket] | None = None,
    bucket_crop: str = "random",
    batch_size: int | None = None,
    drop_last: bool = False,
) -> ImageTextDataset:
    """Image-caption samples (or batches) from WebDataset shards, as an IterableDataset for a DataLoader.

    Each sample: ``{"image": (3, H, W) float in [-1, 1], "caption": str, "key": str,
    "original_size": (2,) long (h, w) before resizing, "crop_coords": (2,) long (top, left) of the crop
    in the resized image (before any flip), "target_size": (2,) long (H, W), "skipped": {reason: count}
    dropped by this worker since its previous sample}``. Images: JPEGs decoded in draft mode (see
    ``decode_rgb``), resized to cover the target and cropped to it: a ``resolution`` square (random
    crop when ``train`` and ``random_crop``, else centred), or with ``buckets`` ((height, width) list,
    see ``ldm.data.buckets``) the bucket nearest the image's aspect ratio (random crop when ``train``
    and ``bucket_crop="random"``); mirrored with probability 1/2 when ``train`` and ``random_flip``.
    ``batch_size``: yield collated batches instead (``collate_samples``), each of one bucket, per
    worker (use ``DataLoader(batch_size=None)``), with ``"stream_position"`` (a ``StreamPosition`` as
    a dict, for exact resumption) and ``"skipped"`` summed per batch; ``drop_last`` drops each
    worker's partial batches (the partial batch of each bucket at the end of a finite stream).
    Captions: a JSON ``captions``
    list (one drawn at random when ``train``, else the first), else ``KEY.txt``, else the JSON
    ``caption``; with ``train``, replaced by "" with probability ``caption_dropout_prob``.
    ``filters`` leave out samples by their JSON metadata (see ``MetadataFilters``), counted as ``filtered_*``.

    ``mode="resampled"`` (default when ``train``): each source's shards are split by rank
    (``source[rank::world_size]``, disjoint; an error if a source has fewer shards than ranks) then by
    worker, read in endless reshuffled passes, sources mixed sample by sample with ``source_weights``
    (then ``shards`` holds one spec per source), through a ``shuffle_buffer``-sample shuffle, cut to
    ``epoch_length`` samples per rank (the same number of batches on every rank, so DDP ranks stay in
    step; None: endless; with ``batch_size``: that many samples' worth of full batches per worker).
    The order is drawn from (seed, rank, worker, epoch), each sample's crop, flip and caption draws from
    that and its position in the worker's stream: reproducible, and resumable without decoding.
    ``mode="exactly_once"`` (default otherwise): every sample once over all ranks and workers, in
    shard order; ranks may get different numbers of samples.

    Bad data never stops the stream: corrupt images, missing captions, invalid JSON, truncated tars
    and unreadable shards are skipped, counted in ``skip_counter`` (in the process that iterates; with
    dataloader workers use ``batch["skipped"]`` from ``collate_samples``) and the first few of each
    reason are logged. Unless ``max_skip_rate`` is None, a worker that has read at least
    ``skip_rate_min_samples`` samples and skipped more than that fraction for damage raises a
    RuntimeError naming the worst shards and reasons. ``rank``/``world_size`` default to
    torch.distributed, else env RANK/WORLD_SIZE, read when the dataset is built.
    """
    return ImageTextDataset(
        shards, resolution, train, mode=mode, random_crop=random_crop, random_flip=random_flip,
        source_weights=source_weights, shuffle_buffer=shuffle_buffer, epoch_length=epoch_length, seed=seed,
        skip_counter=skip_counter, rank=rank, world_size=world_size, filters=filters,
        caption_dropout_prob=caption_dropout_prob, max_skip_rate=max_skip_rate,
        skip_rate_min_samples=skip_rate_min_samples, buckets=buckets, bucket_crop=bucket_crop,
        batch_size=batch_size, drop_last=drop_last,
    )
