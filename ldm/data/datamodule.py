"""LightningDataModules over image-text WebDataset shards (or the built-in synthetic set), and over latent shards."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ldm.config_check import build_options
from ldm.data.distributed import EndTogether
from ldm.data.filters import MetadataFilters, caption_candidates
from ldm.data.latents import LatentTextDataset
from ldm.data.resume import SkipAhead, batches_per_worker
from ldm.data.shards import (
    MODES,
    ShardStream,
    collate_samples,
    distributed_rank_and_world_size,
    expand_shards,
    image_text_dataset,
    read_tar_samples,
)
from ldm.data.skips import SkipCounter
from ldm.data.synthetic import SyntheticSet

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
    return [url for url in urls if url not in missing_set]


class ShardDataModule(L.LightningDataModule):
    """Training and validation dataloaders over WebDataset shards (img2dataset layout).

    Batches: ``{"image": (B, 3, resolution, resolution) float in [-1, 1], "caption": list[str],
    "key": list[str], "original_size": (B, 2) long, "crop_coords": (B, 2) long, "skipped": {reason: count}}``.

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

    Exact resume: the training batches consumed per rank are counted and saved in checkpoints
    (``state_dict``); a resumed run's stream continues from that position (``ldm.data.resume``).
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

    def _loader(self, dataset: torch.utils.data.IterableDataset, batch_size: int, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
        )

    def stream_options(self) -> dict[str, Any]:
        """Keyword arguments of ``ShardStream`` shared by training and validation."""
        return dict(seed=self.seed, filters=self.filters, max_skip_rate=self.max_skip_rate,
                    skip_rate_min_samples=self.skip_rate_min_samples)

    def dataset(self, urls: list, train: bool) -> ShardStream:
        """The training (``train``) or validation stream over ``urls``."""
        if train:
            return image_text_dataset(
                urls, self.resolution, train=True, mode=self.train_mode, source_weights=self.train_shard_weights,
                caption_dropout_prob=self.caption_dropout_prob, shuffle_buffer=self.shuffle_buffer,
                epoch_length=self.train_epoch_length, random_crop=self.random_crop, random_flip=self.random_flip,
                **self.stream_options(),
            )
        return image_text_dataset(urls, self.resolution, train=False, **self.stream_options())

    def train_dataloader(self) -> DataLoader | EndTogether:
        """Resampled: an endless shuffled stream of this rank's shards, ``train_epoch_length`` samples
        per epoch. Exactly-once: one pass over the shards per epoch, ranks ending together."""
        if self.train_urls is None:
            self.setup("fit")
        dataset = self.dataset(self.train_urls, train=True)
        if self.train_batches_consumed:
            dataset = self._continued(dataset)
        # Each worker batches its own samples: dropping partial batches keeps the batch count equal on all ranks.
        loader = self._loader(dataset, self.batch_size, drop_last=True)
        return EndTogether(loader) if self.train_mode == "exactly_once" else loader

    def _continued(self, dataset: ShardStream) -> torch.utils.data.IterableDataset:
        """The training stream from the restored position: resampled streams continue exactly where they
        were; an exactly-once stream has no fixed epoch length, so it starts a new pass over its shards."""
        if self.train_mode != "resampled":
            logger.warning("resuming an exactly-once training stream after %d batches: it starts a new pass over "
                           "its shards (only data.train_mode=resampled continues at the exact sample)",
                           self.train_batches_consumed)
            return dataset
        per_epoch = sum(batches_per_worker(self.train_epoch_length, self.num_workers, self.batch_size))
        epoch, batches_into_epoch = divmod(self.train_batches_consumed, per_epoch)
        return SkipAhead(dataset, epoch, batches_into_epoch, self.batch_size, self.num_workers)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.train_batches_consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position: batches per rank, and samples over all ranks (for the logs)."""
        world_size = self.trainer.world_size if self.trainer is not None else distributed_rank_and_world_size()[1]
        return {"train_batches_consumed": self.train_batches_consumed, "batch_size": self.batch_size,
                "num_workers": self.num_workers, "train_epoch_length": self.train_epoch_length,
                "world_size": world_size,
                "train_samples_consumed": self.train_batches_consumed * self.batch_size * world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream where the checkpoint left it (the same settings give the same stream)."""
        world_size = self.trainer.world_size if self.trainer is not None else distributed_rank_and_world_size()[1]
        saved = {key: state_dict[key] for key in ("batch_size", "num_workers", "train_epoch_length", "world_size")}
        now = {"batch_size": self.batch_size, "num_workers": self.num_workers,
               "train_epoch_length": self.train_epoch_length, "world_size": world_size}
        changed = {key: (saved[key], now[key]) for key in saved if saved[key] != now[key]}
        if changed:
            logger.warning("resuming with changed data settings %s (saved, now): the stream continues at the "
                           "same sample count but will not match an uninterrupted run",
                           {f"data.{k}" if k != "world_size" else k: v for k, v in changed.items()})
        samples_per_rank = int(state_dict["train_batches_consumed"]) * int(saved["batch_size"])
        self.train_batches_consumed = samples_per_rank // self.batch_size

    def val_dataloader(self) -> DataLoader | list:
        """Every validation sample once across ranks and workers; ``[]`` (no validation) without val shards."""
        if self.train_urls is None:
            self.setup("validate")
        if not self.val_urls:
            return []
        return self._loader(self.dataset(self.val_urls, train=False), self.val_batch_size, drop_last=False)


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
        super().__init__(train_shards=train_shards, val_shards=val_shards, **options)
        self.use_text_states = use_text_states

    def dataset(self, urls: list, train: bool) -> ShardStream:
        """The training (``train``) or validation stream of latent samples over ``urls``."""
        if train:
            return LatentTextDataset(
                urls, train=True, mode=self.train_mode, use_text_states=self.use_text_states,
                source_weights=self.train_shard_weights, caption_dropout_prob=self.caption_dropout_prob,
                shuffle_buffer=self.shuffle_buffer, epoch_length=self.train_epoch_length, **self.stream_options(),
            )
        return LatentTextDataset(urls, train=False, use_text_states=self.use_text_states, **self.stream_options())
