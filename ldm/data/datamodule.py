"""LightningDataModules over image-text WebDataset shards (or the built-in synthetic set), and over latent shards."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import tarfile
from collections import Counter
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ldm.config_check import ConfigError, build_options
from ldm.data.buckets import BUCKET_CROPS, BucketGrid, cover_scale, resolve_buckets
from ldm.data.distributed import EndTogether
from ldm.data.filters import MetadataFilters, caption_candidates
from ldm.data.latents import LatentTextDataset, check_latent_manifests
from ldm.data.resume import StreamPosition, batches_per_worker, first_worker_after
from ldm.data.shards import image_text_dataset
from ldm.data.skips import SkipCounter
from ldm.data.stream import MODES, ShardStream
from ldm.data.synthetic import SyntheticSet
from ldm.data.tars import expand_shards, read_tar_samples
from ldm.ranks import rank_and_world_size

logger = logging.getLogger(__name__)

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://", "ais://")


def existing_shards(spec: str, name: str) -> list[str]:
    """The shards that ``spec`` (brace pattern) names and that exist; remote URLs are kept unchecked.

    Raises FileNotFoundError naming ``name`` and the pattern when no local file matches; warns
    when only some are missing (they would be skipped as unreadable anyway).
    """
    urls = expand_shards(spec)
    local = [url for url in urls if not url.startswith(_REMOTE_PREFIXES)]
    missing = [url for url in local if not os.path.isfile(url)]
    if local and len(missing) == len(local):
        raise FileNotFoundError(
            f"data.{name}={spec!r} expands to {len(urls)} path(s) but no file matched (first: {urls[0]}); "
            f"check the path and the brace range, or use data=synthetic for the built-in set"
        )
    if missing:
        logger.warning("data.%s: %d of %d shards do not exist and are left out (first: %s)",
                       name, len(missing), len(urls), missing[0])
    missing_set = set(missing)
    found = [url for url in urls if url not in missing_set]
    check_some_shard_is_a_tar([url for url in found if url in set(local)], f"data.{name}={spec!r}")
    return found


def check_some_shard_is_a_tar(paths: list[str], key: str) -> None:
    """``ConfigError`` naming ``key`` and the first file when not one of the local ``paths`` is a tar archive
    (empty files, other formats): nothing could be read from them. Stops at the first tar, so a long list of
    good shards costs one open; a few bad shards among good ones are left to be skipped and counted."""
    first_problem = None
    for path in paths:
        if os.path.getsize(path) == 0:
            first_problem = first_problem or f"{path} is an empty file"
        elif tarfile.is_tarfile(path):
            return
        else:
            first_problem = first_problem or f"{path} is not a tar archive"
    if first_problem:
        raise ConfigError(f"{key}: no shard is a readable tar archive ({first_problem}); point it at WebDataset "
                          f"shards (python -m ldm.tools.make_shards makes them)")


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore Ctrl-C, which a terminal sends to the whole process group: the main process stops
    after its step and writes a checkpoint, and needs the workers' batches until then (a worker that died of
    the signal would end the run with an error instead). SIGTERM keeps its default in workers: the loader ends
    a worker it no longer needs with SIGTERM (an exactly-once epoch that stops early), and a worker that
    ignored it would hang the run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardDataModule(L.LightningDataModule):
    """Training and validation dataloaders over WebDataset shards (img2dataset layout).

    Batches: ``{"image": (B, 3, H, W) float in [-1, 1], "caption": list[str], "key": list[str],
    "original_size": (B, 2) long (source h, w), "crop_coords": (B, 2) long (top, left), "target_size":
    (B, 2) long (H, W), "skipped": {reason: count}, "stream_position": dict}``: H = W = ``resolution``,
    or with ``buckets`` (a list of [height, width], or a ``BucketGrid`` / its mapping; see
    ``ldm.data.buckets``) one bucket per batch, each image in the bucket nearest its aspect ratio,
    cropped at random (``bucket_crop="random"``, training) or centred.

    Training (``train_mode="resampled"``) reads an endless, shuffled stream of each rank's own shards,
    cut into epochs of ``train_epoch_length`` samples per rank (full batches only; the same number of
    batches on every rank), with random crops (``random_crop``), optional flips and caption dropout;
    ``train_shards`` may list several sources mixed by ``train_shard_weights``. ``"exactly_once"``
    reads every sample once per epoch and ends the ranks' epochs together (``EndTogether``).
    Validation reads every sample once, unshuffled, across ranks. ``filters`` (``MetadataFilters`` or
    its keyword arguments), ``max_skip_rate`` and ``skip_rate_min_samples``: see ``image_text_dataset``.
    When ``synthetic`` (a ``SyntheticSet`` or its fields, including ``data_dir``) is
    given and ``train_shards`` is not, the built-in set is generated in ``prepare_data`` and used;
    its validation shards are used unless ``val_shards`` is given.

    Exact resume: the training batches consumed per rank, and each loader worker's stream position
    after its last consumed batch, are saved in checkpoints (``state_dict``, gathered from every rank);
    a resumed run's stream continues from there without decoding what was consumed (``ldm.data.resume``).
    ``bucket_report()``: training samples per bucket, and how many were upscaled more than 2x.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | None = None,
        resolution: int = 32,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        caption_dropout_prob: float = 0.1,
        shuffle_buffer: int = 1000,
        train_epoch_length: int = 100_000,
        seed: int = 0,
        synthetic: SyntheticSet | Mapping[str, Any] | None = None,
        train_shard_weights: list[float] | None = None,
        train_mode: str = "resampled",
        random_crop: bool = True,
        random_flip: bool = False,
        filters: MetadataFilters | Mapping[str, Any] | None = None,
        max_skip_rate: float | None = None,
        skip_rate_min_samples: int = 1000,
        buckets: list[list[int]] | BucketGrid | None = None,
        bucket_crop: str = "random",
    ) -> None:
        super().__init__()
        if train_mode not in MODES:
            raise ValueError(f"data.train_mode={train_mode!r} is unknown; choose one of {MODES}")
        if train_shard_weights is not None and (isinstance(train_shards, str) or train_shards is None
                                                or len(train_shards) != len(train_shard_weights)):
            raise ValueError(
                f"data.train_shard_weights={list(train_shard_weights)} needs data.train_shards to be a list with one "
                f"shard spec per weight, e.g. ['/laion/{{00000..09999}}.tar', '/coyo/{{0000..0999}}.tar']"
            )
        if resolution <= 0:
            raise ValueError(f"data.resolution={resolution} must be a positive number of pixels, e.g. 256")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size={batch_size} must be positive")
        if val_batch_size is not None and val_batch_size <= 0:
            raise ValueError(f"data.val_batch_size={val_batch_size} must be positive, or null to use data.batch_size")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0 (0 loads in the main process)")
        if not 0.0 <= caption_dropout_prob <= 1.0:
            raise ValueError(f"data.caption_dropout_prob={caption_dropout_prob} must lie in [0, 1] (0.1 is usual)")
        if max_skip_rate is not None and not 0.0 < max_skip_rate <= 1.0:
            raise ValueError(f"data.max_skip_rate={max_skip_rate} must lie in (0, 1] (e.g. 0.2), or null for no ceiling")
        if train_shard_weights is not None and not all(math.isfinite(w) and w > 0 for w in train_shard_weights):
            raise ValueError(f"data.train_shard_weights={list(train_shard_weights)} must be finite and > 0")
        if shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer={shuffle_buffer} must be >= 0")
        if train_epoch_length < batch_size * max(1, num_workers):
            raise ValueError(
                f"data.train_epoch_length={train_epoch_length} samples per rank must give every one of the "
                f"{max(1, num_workers)} loader worker(s) a full batch of {batch_size}; "
                f"set it to at least {batch_size * max(1, num_workers)}"
            )
        if bucket_crop not in BUCKET_CROPS:
            raise ValueError(f"data.bucket_crop={bucket_crop!r} is unknown; choose one of {BUCKET_CROPS}")
        self.buckets = resolve_buckets(buckets, resolution, "data.buckets")
        self.bucket_crop = bucket_crop
        if train_shards is None and synthetic is None:
            raise ValueError(
                "no training data: set data.train_shards (e.g. '/data/laion/{00000..00099}.tar') "
                "or use data=synthetic for the built-in set"
            )
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.caption_dropout_prob = caption_dropout_prob
        self.shuffle_buffer = shuffle_buffer
        self.train_epoch_length = train_epoch_length
        self.seed = seed
        self.synthetic = build_options(SyntheticSet, synthetic, "data.synthetic")
        self.train_shard_weights = list(train_shard_weights) if train_shard_weights is not None else None
        self.train_mode = train_mode
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.filters = build_options(MetadataFilters, filters, "data.filters")
        self.max_skip_rate = max_skip_rate
        self.skip_rate_min_samples = skip_rate_min_samples
        self.train_urls: list[str] | list[list[str]] | None = None
        self.val_urls: list[str] | None = None
        self.train_batches_consumed = 0  # per rank, over the whole run (restored on resume)
        self.stream_positions: dict[int, StreamPosition] = {}  # per loader worker: after its last consumed batch
        self.last_worker: int | None = None  # the worker of the last consumed batch
        self.bucket_counts: Counter[tuple[int, int]] = Counter()  # training samples per (height, width)
        self.upscaled_counts: Counter[tuple[int, int]] = Counter()  # of which upscaled by more than 2x

    def _uses_synthetic(self) -> bool:
        return self.synthetic is not None and self.train_shards is None

    def prepare_data(self) -> None:
        """Generate the built-in set if it is used and missing (Lightning runs this on one process per node)."""
        if self._uses_synthetic():
            self.synthetic.ensure()

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard patterns to existing files (runs on every rank)."""
        train_spec, val_spec = self.train_shards, self.val_shards
        if self._uses_synthetic():
            # Already generated by prepare_data; this only computes the paths (or waits out a race).
            train_spec, synthetic_val = self.synthetic.ensure()
            val_spec = val_spec or synthetic_val
        if self.train_shard_weights is not None:  # one list of URLs per weighted source
            self.train_urls = [existing_shards(spec, f"train_shards[{i}]") for i, spec in enumerate(train_spec)]
        else:
            specs = [train_spec] if isinstance(train_spec, str) else list(train_spec)
            self.train_urls = [url for spec in specs for url in existing_shards(spec, "train_shards")]
        self.val_urls = existing_shards(val_spec, "val_shards") if val_spec else None

    def validation_captions(self) -> list[str]:
        """The caption of every validation sample, in shard order (each sample's first caption; samples
        the metadata filters leave out are left out). Reads only the tar members, decodes no image."""
        if self.train_urls is None:
            self.setup("validate")
        captions = []
        counter = SkipCounter()
        for url in self.val_urls or []:
            for raw in read_tar_samples(url, counter):
                try:
                    metadata = json.loads(raw["json"]) if "json" in raw else {}
                except ValueError:  # counted and skipped by the validation stream as well
                    continue
                if not isinstance(metadata, dict):
                    continue
                candidates = caption_candidates(raw.get("txt"), metadata)
                if candidates and (self.filters is None
                                   or self.filters.rejects_metadata(metadata, candidates[0]) is None):
                    captions.append(candidates[0])
        return captions

    def _loader(self, dataset: ShardStream) -> DataLoader:
        # The stream batches (by bucket) in each worker; the loader only moves the batches.
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          worker_init_fn=ignore_stop_signals)

    def stream_options(self) -> dict[str, Any]:
        """Keyword arguments of ``ShardStream`` shared by training and validation."""
        return dict(seed=self.seed, filters=self.filters, max_skip_rate=self.max_skip_rate,
                    skip_rate_min_samples=self.skip_rate_min_samples)

    def dataset(self, urls: list, train: bool) -> ShardStream:
        """The training (``train``; full batches only) or validation stream of batches over ``urls``."""
        images = dict(buckets=self.buckets, bucket_crop=self.bucket_crop)
        if train:
            return image_text_dataset(
                urls, self.resolution, train=True, mode=self.train_mode, source_weights=self.train_shard_weights,
                caption_dropout_prob=self.caption_dropout_prob, shuffle_buffer=self.shuffle_buffer,
                epoch_length=self.train_epoch_length, random_crop=self.random_crop, random_flip=self.random_flip,
                batch_size=self.batch_size, drop_last=True, **images, **self.stream_options(),
            )
        return image_text_dataset(urls, self.resolution, train=False, batch_size=self.val_batch_size, **images,
                                  **self.stream_options())

    def train_dataloader(self) -> DataLoader | EndTogether:
        """Resampled: an endless shuffled stream of this rank's shards, ``train_epoch_length`` samples
        per epoch. Exactly-once: one pass over the shards per epoch, ranks ending together."""
        if self.train_urls is None:
            self.setup("fit")
        dataset = self.dataset(self.train_urls, train=True)
        if self.train_batches_consumed:
            self._continue(dataset)
        loader = self._loader(dataset)
        return EndTogether(loader) if self.train_mode == "exactly_once" else loader

    def _continue(self, dataset: ShardStream) -> None:
        """Point the training stream at the restored position: a resampled stream continues exactly where it
        was; an exactly-once stream has no fixed epoch length, so it starts a new pass over its shards."""
        if self.train_mode != "resampled":
            logger.warning("resuming an exactly-once training stream after %d batches: it starts a new pass over "
                           "its shards (only data.train_mode=resampled continues at the exact sample)",
                           self.train_batches_consumed)
            return
        per_epoch = sum(batches_per_worker(self.train_epoch_length, self.num_workers, self.batch_size))
        epoch, batches_into_epoch = divmod(self.train_batches_consumed, per_epoch)
        first_worker = first_worker_after(self.last_worker, self.num_workers) if batches_into_epoch else 0
        dataset.continue_from(epoch, self.stream_positions, first_worker)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        position = batch.pop("stream_position", None) if isinstance(batch, dict) else None
        if self.trainer is None or self.trainer.training:  # no trainer: a training loop of the caller's
            self.train_batches_consumed += 1
            if position is not None:
                saved = StreamPosition.from_dict(position)
                self.stream_positions[saved.worker] = saved
                self.last_worker = saved.worker
            if "target_size" in batch:
                self._count_buckets(batch)
        return batch

    def _count_buckets(self, batch: dict) -> None:
        for target, original in zip(batch["target_size"].tolist(), batch["original_size"].tolist()):
            bucket = (int(target[0]), int(target[1]))
            self.bucket_counts[bucket] += 1
            if min(original) > 0 and cover_scale(original[0], original[1], bucket) > 2:
                self.upscaled_counts[bucket] += 1

    def bucket_report(self) -> dict[str, Any]:
        """Training samples per bucket on this rank so far (this run and those it resumed), and how many of
        them were upscaled by more than 2x to cover their bucket: ``{"buckets": [{"height", "width",
        "samples", "upscaled_over_2x"}], "samples", "upscaled_over_2x"}``."""
        rows = [{"height": h, "width": w, "samples": self.bucket_counts[(h, w)],
                 "upscaled_over_2x": self.upscaled_counts[(h, w)]}
                for h, w in sorted(self.bucket_counts, key=lambda bucket: bucket[1] / bucket[0])]
        return {"buckets": rows, "samples": sum(self.bucket_counts.values()),
                "upscaled_over_2x": sum(self.upscaled_counts.values())}

    def _settings(self) -> dict[str, Any]:
        world_size = self.trainer.world_size if self.trainer is not None else rank_and_world_size()[1]
        return {"batch_size": self.batch_size, "num_workers": self.num_workers,
                "train_epoch_length": self.train_epoch_length, "world_size": world_size,
                "buckets": [list(bucket) for bucket in self.buckets] if self.buckets is not None else None}

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position (batches per rank; every rank's worker positions, gathered here:
        Lightning calls this on every rank and rank 0 writes it), the bucket counts, and the settings."""
        own = {"workers": [position.as_dict() for _, position in sorted(self.stream_positions.items())],
               "last_worker": self.last_worker,
               "bucket_counts": [[h, w, self.bucket_counts[(h, w)], self.upscaled_counts[(h, w)]]
                                 for h, w in sorted(self.bucket_counts)]}
        ranks = [own]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, own)
        return {"train_batches_consumed": self.train_batches_consumed, **self._settings(), "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream where the checkpoint left it (the same settings give the same stream)."""
        now = self._settings()
        saved = {key: state_dict.get(key) for key in now}
        changed = {key: (saved[key], now[key]) for key in saved if saved[key] != now[key]}
        samples_per_rank = int(state_dict["train_batches_consumed"]) * int(saved["batch_size"])
        self.train_batches_consumed = samples_per_rank // self.batch_size
        rank = self.trainer.global_rank if self.trainer is not None else rank_and_world_size()[0]
        ranks = state_dict.get("ranks") or []
        if changed or rank >= len(ranks):
            logger.warning("resuming with changed data settings %s (saved, now): the stream starts its current epoch "
                           "again and will not match an uninterrupted run",
                           {f"data.{k}" if k != "world_size" else k: v for k, v in changed.items()})
            return
        own = ranks[rank]
        self.stream_positions = {int(p["worker"]): StreamPosition.from_dict(p) for p in own["workers"]}
        self.last_worker = own["last_worker"]
        if rank == 0:  # the counts of every rank, summed once
            for other in ranks:
                for h, w, samples, upscaled in other.get("bucket_counts", []):
                    self.bucket_counts[(h, w)] += samples
                    self.upscaled_counts[(h, w)] += upscaled

    def val_dataloader(self) -> DataLoader | list:
        """Every validation sample once across ranks and workers; ``[]`` (no validation) without val shards."""
        if self.train_urls is None:
            self.setup("validate")
        if not self.val_urls:
            return []
        return self._loader(self.dataset(self.val_urls, train=False))


class LatentShardDataModule(ShardDataModule):
    """Training and validation dataloaders over precomputed latent shards (``python -m
    ldm.tools.precompute_latents``): ``LatentDiffusion`` draws latents from the stored posterior and
    never calls the VAE encoder.

    Batches: ``{"latent_mean", "latent_std": (B, C, h, w) float32, "caption": list[str], "key": list[str],
    "original_size", "crop_coords": (B, 2) long, ["text_states": (B, L, D) float32 with use_text_states],
    "skipped": {reason: count}}``. Modes, sources, filters, caption dropout and the skip-rate ceiling
    are those of ``ShardDataModule``; crops and flips were fixed when the latents were made.
    """

    def __init__(self, train_shards: str | list[str], val_shards: str | None = None, use_text_states: bool = False,
                 **options) -> None:
        if options.get("buckets") is not None:
            raise ValueError("data.buckets does not apply to data=latents: the latents keep the sizes they were "
                             "made at (precompute_latents --buckets); set data.buckets=null")
        super().__init__(train_shards=train_shards, val_shards=val_shards, **options)
        self.use_text_states = use_text_states

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard patterns, then hold them to their ``latents.json``: the resolution, text states and,
        when the trainer's module reads its VAE from a file, that VAE (``check_latent_manifests``)."""
        super().setup(stage)
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        vae_weights = (getattr(module, "frozen_files", None) or {}).get("vae_weights")
        train = self.train_urls if self.train_shard_weights is None else [u for urls in self.train_urls for u in urls]
        check_latent_manifests([*train, *(self.val_urls or [])], self.resolution, self.use_text_states, vae_weights)

    def dataset(self, urls: list, train: bool) -> ShardStream:
        """The training (``train``) or validation stream of latent samples over ``urls``."""
        if train:
            return LatentTextDataset(
                urls, train=True, mode=self.train_mode, use_text_states=self.use_text_states,
                source_weights=self.train_shard_weights, caption_dropout_prob=self.caption_dropout_prob,
                shuffle_buffer=self.shuffle_buffer, epoch_length=self.train_epoch_length,
                batch_size=self.batch_size, drop_last=True, **self.stream_options(),
            )
        return LatentTextDataset(urls, train=False, use_text_states=self.use_text_states,
                                 batch_size=self.val_batch_size, **self.stream_options())
