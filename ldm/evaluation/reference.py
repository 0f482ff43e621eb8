"""The real images of a reference set, and their features cached once per (data set's contents, resolution,
extractor)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from ldm.checkpoints import save_weights
from ldm.data.filters import caption_candidates
from ldm.data.shards import image_text_dataset
from ldm.data.skips import SkipCounter
from ldm.data.tars import expand_shards, read_tar_samples
from ldm.data.transforms import open_image, to_rgb
from ldm.interchange.frozen_files import file_sha256

logger = logging.getLogger(__name__)


def read_image_caption_set(shards: str | list[str], resolution: int, limit: int | None = None) -> tuple[Tensor, list[str]]:
    """The first ``limit`` (all when None) images (N, 3, resolution, resolution) in [0, 1] of the shards, in
    shard order, centre-cropped, with their captions. Reads everything in this process, whatever the rank."""
    images, captions = [], []
    for sample in image_text_dataset(shards, resolution=resolution, train=False, rank=0, world_size=1):
        images.append((sample["image"] + 1) / 2)
        captions.append(sample["caption"])
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"no readable image-caption samples in {shards}; check the shard paths")
    return torch.stack(images), captions


def read_images_by_size(shards: str | list[str], limit: int | None = None
                        ) -> dict[tuple[int, int], tuple[list[Tensor], list[str]]]:
    """The first ``limit`` (all when None) images of the shards at their stored size, grouped by (height, width):
    ``{(h, w): ([(3, h, w) in [0, 1], ...], [caption, ...])}``, in shard order, each with its first caption.
    For sets stored at their bucket sizes (the built-in multi-aspect set); unreadable samples are counted and
    left out, as the data pipeline does."""
    groups: dict[tuple[int, int], tuple[list[Tensor], list[str]]] = {}
    counter, read = SkipCounter(), 0
    for url in expand_shards(shards):
        for raw in read_tar_samples(url, counter):
            image_bytes = raw.get("png") or raw.get("jpg") or raw.get("jpeg") or raw.get("webp")
            try:
                metadata = json.loads(raw["json"]) if "json" in raw else {}
                captions = caption_candidates(raw.get("txt"), metadata if isinstance(metadata, dict) else {})
                with open_image(image_bytes) as image:
                    pixels = torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1)
            except Exception as error:  # PIL raises many types for corrupt files; JSON raises ValueError
                counter.add("corrupt_image", f"{url} {raw['__key__']}: {type(error).__name__}", shard=url)
                continue
            if not captions:
                counter.add("missing_caption", f"{url} {raw['__key__']}", shard=url)
                continue
            images, texts = groups.setdefault(tuple(pixels.shape[1:]), ([], []))
            images.append(pixels.float() / 255)
            texts.append(captions[0])
            read += 1
            if limit is not None and read >= limit:
                return groups
    if not groups:
        raise ValueError(f"no readable image-caption samples in {shards}; check the shard paths")
    return groups


def shard_fingerprint(shards: str | list[str]) -> list[tuple[str, str]]:
    """(name, sha256 of its bytes) of each local shard, so that other images under the same names and sizes
    key another cache entry; a remote shard (``pipe:``, a URL) is keyed by its URL alone."""
    return [(os.path.basename(url), file_sha256(url)) if os.path.isfile(url) else (url, "not a local file")
            for url in expand_shards(shards)]


def read_cached_features(path: Path, limit: int | None = None) -> tuple[Tensor, list[str]]:
    """Features (N, D) float64 and N captions from a reference cache file; ``ValueError`` naming the file
    when it does not read as such (damaged, cut, another file), holds non-finite values or other shapes."""
    from ldm.checkpoints import read_metadata

    try:
        captions = json.loads(read_metadata(path)["captions"])
        features = load_file(str(path))["features"]
    except Exception as error:  # safetensors, JSON and a missing key raise different types
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise ValueError(f"the reference feature cache {path} is unreadable ({reason}); delete it to compute the "
                         f"features again") from error
    problem = None
    if features.ndim != 2 or features.dtype != torch.float64:
        problem = f"features of shape {tuple(features.shape)} and {features.dtype}, not (N, D) float64"
    elif not isinstance(captions, list) or len(captions) != len(features):
        problem = f"{len(features)} feature rows for {len(captions) if isinstance(captions, list) else 'no'} captions"
    elif limit is not None and len(features) > limit:
        problem = f"{len(features)} feature rows, more than the {limit} images asked for"
    elif not torch.isfinite(features).all():
        problem = "non-finite features"
    if problem:
        raise ValueError(f"the reference feature cache {path} holds {problem}; delete it to compute the features again")
    return features, captions


@torch.no_grad()
def extract_features(extractor: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 256) -> Tensor:
    """Features (N, D) float64 of images (N, 3, H, W) in [0, 1], in batches, on the extractor's device."""
    parameters = extractor.parameters() if isinstance(extractor, torch.nn.Module) else iter(())
    device = next(parameters, torch.empty(0)).device
    parts = [extractor(images[start : start + batch_size].to(device)).double().cpu()
             for start in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.float64)


def reference_features(
    shards: str,
    resolution: int,
    extractor: Callable[[Tensor], Tensor],
    extractor_name: str,
    cache_dir: str | Path | None,
    limit: int | None = None,
) -> tuple[Tensor, list[str], Path | None]:
    """Features (N, D) float64 of the first ``limit`` real images of ``shards``, their captions, and the cache file.

    Computed once per (shards' names and contents, resolution, limit, extractor) and stored as
    ``{cache_dir}/reference-{hash}.safetensors`` (captions in its metadata); later calls read the
    file, checked (``read_cached_features``). ``cache_dir=None`` turns the cache off.
    """
    key = dict(shards=shard_fingerprint(shards), resolution=resolution, limit=limit, extractor=extractor_name)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"reference-{digest}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        features, captions = read_cached_features(path, limit)
        return features, captions, path
    images, captions = read_image_caption_set(shards, resolution, limit)
    features = extract_features(extractor, images)
    if path is not None:
        save_weights({"features": features}, path, metadata=dict(key=key, captions=captions))
        logger.info("Cached the features of %d reference images at %s", len(features), path)
    return features, captions, path
