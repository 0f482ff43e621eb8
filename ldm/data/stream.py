"""The stream of WebDataset shards (img2dataset layout: KEY.jpg|png|webp, KEY.txt, KEY.json), split over ranks
and workers, in which every sample is a decoded training sample (``ShardStream``; subclasses decode).

The stages are written out here rather than chained on ``wds.WebDataset``, because this module
must decide exactly which shards each rank and worker reads (tests prove it), and must turn every
kind of bad input into a counted skip with a named reason (a shard's own reading and damage:
``ldm.data.tars``; the decoding of image samples: ``ldm.data.shards``, of latent samples: ``ldm.data.latents``).

    sources ── split by rank ── split by worker ── tar members grouped by key
      ── mode "resampled": endless reshuffled passes per source, mixed by weight, shuffle buffer
         mode "exactly_once": every sample once over all ranks and workers, in shard order
      ── metadata filters ── decode (JPEG draft), bucket, resize, crop, flip, caption choice and dropout
      ── skip-rate ceiling ── samples, or (``batch_size``) batches of one bucket each
      ── (resampled: cut to the epoch length)

The order of the stream (shard permutations, source mixing, the shuffle buffer) draws from one
generator per (seed, rank, worker, epoch); each sample's own draws from a generator seeded by that
and its position in the stream, so a resumed stream can walk over what was consumed without
decoding it (``ldm.data.resume``).

Skip counts travel with the data: ``sample["skipped"]`` (or ``batch["skipped"]``) holds what its
worker dropped since its previous sample (batch), and ``collate_samples`` sums them, so the
training process sees the counts of every dataloader worker.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ldm.data.buckets import BucketBatcher
from ldm.data.collate import collate_samples
from ldm.data.filters import MetadataFilters, caption_candidates, choose_caption
from ldm.data.resume import StreamPosition, batches_per_worker, load_indexed_sample
from ldm.data.skips import SkipCounter
from ldm.data.tars import expand_shards, read_tar_samples, shard_samples
from ldm.ranks import rank_and_world_size

MODES = ("resampled", "exactly_once")
# A worker that skips this many samples in a row, before yielding any, is reading unusable data.
MAX_SKIPS_BEFORE_FIRST_SAMPLE = 10_000


def expand_sources(
    shards: str | Sequence[str] | Sequence[Sequence[str]], source_weights: Sequence[float] | None
) -> tuple[list[list[str]], list[float]]:
    """(URLs per source, normalised weights). Without ``source_weights`` all of ``shards`` is one
    source; with them, ``shards`` is a list with one entry (a spec or a list of URLs) per weight."""
    if source_weights is None:
        return [expand_shards(shards)], [1.0]
    weights = [float(w) for w in source_weights]
    if isinstance(shards, str) or len(shards) != len(weights):
        count = 1 if isinstance(shards, str) else len(shards)
        raise ValueError(f"source_weights={list(weights)} gives {len(weights)} weight(s) for {count} shard source(s); "
                         f"give one shard spec per weight, e.g. shards=['/a/{{0..9}}.tar', '/b/{{0..3}}.tar']")
    if any(w < 0 or not np.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"source_weights={weights} must be >= 0 with a positive sum")
    sources = [expand_shards(source) for source in shards]
    return sources, [w / sum(weights) for w in weights]


def _worker_id_and_count() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _split(items: list, part: int, num_parts: int) -> tuple[list, int, int]:
    """Split ``items`` into ``num_parts`` disjoint parts: by item when there are enough items, else
    every part keeps all items and splits their samples instead. Returns (items, sample_part, sample_parts)."""
    if len(items) >= num_parts:
        return items[part::num_parts], 0, 1
    return items, part, num_parts


def _fast_forward(items: Iterator[tuple[int, dict]], position: int, keep: set[int]) -> list[tuple[int, dict]]:
    """Take the first ``position`` items of a positioned stream, returning those at the ``keep`` positions."""
    kept = []
    for index, raw in itertools.islice(items, position):
        if index in keep:
            kept.append((index, raw))
    return kept


class _Continuation:
    """Where a resumed stream's first iteration starts: its epoch, each worker's saved position, and the
    offset that rotates worker roles so a new DataLoader's round robin continues the old one."""

    def __init__(self, positions: dict[int, StreamPosition], first_worker: int) -> None:
        self.positions = positions
        self.first_worker = first_worker


class ShardStream(torch.utils.data.IterableDataset):
    """Samples of WebDataset shards split over ranks and workers, in one of two modes; subclasses
    turn each raw tar sample into a training sample (``decode``). See ``image_text_dataset``."""

    def __init__(
        self,
        shards: str | Sequence[str] | Sequence[Sequence[str]],
        mode: str,
        augment: bool,
        source_weights: Sequence[float] | None = None,
        shuffle_buffer: int = 1000,
        epoch_length: int | None = None,
        seed: int = 0,
        skip_counter: SkipCounter | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        filters: MetadataFilters | None = None,
        caption_dropout_prob: float = 0.0,
        max_skip_rate: float | None = None,
        skip_rate_min_samples: int = 1000,
        batch_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is unknown; choose 'resampled' (endless, for training) or "
                             f"'exactly_once' (every sample once, for evaluation and precomputing)")
        if not 0.0 <= caption_dropout_prob <= 1.0:
            raise ValueError(f"caption_dropout_prob={caption_dropout_prob} must lie in [0, 1] (0.1 is usual)")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 0 (0 turns the sample shuffle off)")
        if epoch_length is not None and epoch_length <= 0:
            raise ValueError(f"epoch_length={epoch_length} must be positive (samples per rank), or None for endless")
        if max_skip_rate is not None and not 0.0 < max_skip_rate <= 1.0:
            raise ValueError(f"max_skip_rate={max_skip_rate} must lie in (0, 1] (e.g. 0.2), or None for no ceiling")
        if skip_rate_min_samples < 1:
            raise ValueError(f"skip_rate_min_samples={skip_rate_min_samples} must be >= 1")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive, or None to yield samples")
        self.sources, self.source_weights = expand_sources(shards, source_weights)
        self.urls = [url for source in self.sources for url in source]
        if (rank is None) != (world_size is None):
            raise ValueError(f"give both rank and world_size or neither (got rank={rank}, world_size={world_size})")
        if rank is None:
            rank, world_size = rank_and_world_size()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if mode == "resampled":
            for source in self.sources:
                if len(source) < world_size:
                    raise ValueError(
                        f"{len(source)} training shard(s) ({source[0]}, ...) cannot give each of {world_size} ranks "
                        f"its own shards; write at least {world_size} shards (e.g. fewer samples per shard) or "
                        f"train on fewer ranks"
                    )
        self.mode = mode
        self.augment = augment
        self.caption_dropout_prob = caption_dropout_prob if augment else 0.0
        self.shuffle_buffer = shuffle_buffer if mode == "resampled" else 0
        self.epoch_length = epoch_length if mode == "resampled" else None
        self.seed = seed
        self.skip_counter = skip_counter
        self.rank, self.world_size = rank, world_size
        self.filters = filters or MetadataFilters()
        self.max_skip_rate = max_skip_rate
        self.skip_rate_min_samples = skip_rate_min_samples
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.epoch = 0  # advanced by each __iter__ in the process that runs it (persistent workers keep it)
        self._continuation: _Continuation | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the random stream of the next iteration (for non-persistent workers, which start from a copy)."""
        self.epoch = epoch

    def continue_from(self, epoch: int, positions: dict[int, StreamPosition], first_worker: int = 0) -> None:
        """Make the next iteration (in each process: every dataloader worker holds a copy) continue epoch
        ``epoch`` from ``positions`` (each worker's last ``batch["stream_position"]``; a worker without one
        starts the epoch), the workers' roles rotated by ``first_worker`` (``resume.first_worker_after``)."""
        if self.batch_size is None or self.mode != "resampled":
            raise ValueError("only a resampled stream that yields batches (batch_size) can continue from a position")
        self.epoch = epoch
        self._continuation = _Continuation(positions, first_worker)

    def bucket_key(self, sample: dict) -> tuple:
        """Samples batch together when their tensors have the same shapes (the same bucket)."""
        return tuple((name, tuple(value.shape)) for name, value in sample.items() if isinstance(value, torch.Tensor))

    def __iter__(self) -> Iterator[dict]:
        physical_worker, num_workers = _worker_id_and_count()
        epoch = self.epoch
        self.epoch += 1
        continuation, self._continuation = self._continuation, None
        worker, start = physical_worker, None
        if continuation is not None:
            worker = (physical_worker + continuation.first_worker) % num_workers
            saved = continuation.positions.get(worker)
            start = saved if saved is not None and saved.epoch == epoch else None
        counter = self.skip_counter if self.skip_counter is not None else SkipCounter()
        counter.take_new()  # counts from an earlier iteration were reported there
        start_totals = (counter.damage_total, counter.shard_damage_total)
        order_rng = np.random.default_rng([self.seed, self.rank, worker, epoch])
        if self.mode == "resampled":
            raw = self._resampled_samples(worker, num_workers, order_rng, counter)
        else:
            raw = self._exactly_once_samples(worker, num_workers, counter)
        items: Iterator[tuple[int, dict]] = enumerate(raw)
        kept: list[tuple[int, dict]] = []
        if start is not None:  # walk over the consumed samples: their order only, no decoding, no counts
            counter.muted = True
            try:
                kept = _fast_forward(items, start.position, set(start.pending))
            finally:
                counter.muted = False
            counter.update(start.skipped)  # for the skip-rate ceiling; reported before, so not again
            counter.take_new()
            items = itertools.chain(kept, items)
        draw_seed = (self.seed, self.rank, worker, epoch) if self.augment else None
        read_before = start.position - len(kept) if start is not None else 0
        samples = self._decoded(items, draw_seed, counter, worker, start_totals, read_before)
        if self.batch_size is None:
            samples = _attach_skip_counts((sample for _, sample in samples), counter)
            if self.epoch_length is not None:
                per_worker = self.epoch_length // num_workers + (worker < self.epoch_length % num_workers)
                samples = itertools.islice(samples, per_worker)
            yield from samples
            return
        limit = None
        if self.epoch_length is not None:
            limit = batches_per_worker(self.epoch_length, num_workers, self.batch_size)[worker]
        yield from self._batches(samples, counter, epoch, worker, start, limit)

    def _batches(self, samples: Iterator[tuple[int, dict]], counter: SkipCounter, epoch: int, worker: int,
                 start: StreamPosition | None, limit: int | None) -> Iterator[dict]:
        """Collated batches of ``batch_size`` samples of one bucket, each with ``"stream_position"``.

        A formed batch is held until the next one forms (or the stream ends), so the skips counted in
        between (and after the last) travel with it; the last batch of an epoch goes out at once.
        """
        batcher = BucketBatcher(self.batch_size)
        epoch_counts: Counter[str] = Counter(start.skipped if start is not None else {})
        produced = start.batches if start is not None else 0
        if limit is not None and produced >= limit:
            return

        def finish(members: list[tuple[int, dict]], position: int, pending: list[int]) -> dict:
            nonlocal produced
            produced += 1
            new = counter.take_new()
            epoch_counts.update(new)
            batch = collate_samples([sample for _, sample in members])
            batch["skipped"] = new
            batch["stream_position"] = StreamPosition(
                epoch, worker, position, sorted(pending), produced, dict(epoch_counts)).as_dict()
            return batch

        held: list[tuple[int, dict]] | None = None
        last_position = start.position - 1 if start is not None else -1
        for position, sample in samples:
            last_position = position
            formed = batcher.add(position, self.bucket_key(sample), sample)
            if formed is None:
                continue
            if held is not None:
                yield finish(held, position + 1, batcher.pending() + [p for p, _ in formed])
            if limit is not None and produced == limit - 1:
                yield finish(formed, position + 1, batcher.pending())
                return
            held = formed
        if held is not None:
            yield finish(held, last_position + 1, batcher.pending())
        if not self.drop_last:
            for members in batcher.leftovers():
                yield finish(members, last_position + 1, batcher.pending())

    def _resampled_samples(
        self, worker: int, num_workers: int, rng: np.random.Generator, counter: SkipCounter
    ) -> Iterator[dict]:
        streams = []
        for source in self.sources:
            rank_urls = source[self.rank :: self.world_size]
            # Workers take disjoint shards when the rank has enough; else each draws its own random
            # order over all of them (seeded by worker), which is as good for an endless stream.
            worker_urls = rank_urls[worker::num_workers] if len(rank_urls) >= num_workers else rank_urls
            streams.append(self._endless_passes(worker_urls, rng, counter))
        raw = streams[0] if len(streams) == 1 else _mixed(streams, self.source_weights, rng)
        if self.shuffle_buffer > 1:
            raw = _buffer_shuffle(raw, self.shuffle_buffer, rng)
        return raw

    def _endless_passes(self, urls: list[str], rng: np.random.Generator, counter: SkipCounter) -> Iterator[dict]:
        while True:
            samples_read = 0
            for index in rng.permutation(len(urls)):
                for raw in shard_samples(urls[index], counter):
                    samples_read += 1
                    yield raw
            if samples_read == 0:
                shown = ", ".join(urls[:3]) + (", ..." if len(urls) > 3 else "")
                raise RuntimeError(
                    f"rank {self.rank} could read no sample from any of its shards ({shown}); "
                    f"skips so far: {counter.as_dict()}; check that the shard files are readable tar archives"
                )

    def _exactly_once_samples(self, worker: int, num_workers: int, counter: SkipCounter) -> Iterator[dict]:
        # Exactly once over all ranks and workers: split by shard where there are enough shards,
        # else split the samples of the shared shards (sources are simply concatenated here).
        urls, rank_part, rank_parts = _split(self.urls, self.rank, self.world_size)
        urls, worker_part, worker_parts = _split(urls, worker, num_workers)
        part, num_parts = rank_part * worker_parts + worker_part, rank_parts * worker_parts
        index = 0
        for url in urls:
            for raw in read_tar_samples(url, counter, count_shard_errors=part == 0):
                if index % num_parts == part:
                    yield raw
                index += 1

    def _decoded(
        self, items: Iterator[tuple[int, dict]], draw_seed: tuple[int, ...] | None, counter: SkipCounter,
        worker: int, start: tuple[int, int], samples_read: int = 0,
    ) -> Iterator[tuple[int, dict]]:
        """(position, sample) of the raw items that decode; each sample's draws seeded by ``draw_seed`` and
        its position (no draws when None). ``start``: damage totals when the iteration began;
        ``samples_read``: raw samples read before (a resumed stream), for the skip-rate ceiling."""
        skipped_before_first = -1 if samples_read else 0
        for position, raw in items:
            samples_read += 1
            if "__members__" in raw:  # a header-only entry of a local tar: its files are read now
                raw = load_indexed_sample(raw)
            rng = np.random.default_rng([*draw_seed, position]) if draw_seed is not None else None
            sample = self.decode_checked(raw, rng, counter)
            if sample is not None:
                skipped_before_first = -1
                yield position, sample
            elif skipped_before_first >= 0:
                skipped_before_first += 1
                if skipped_before_first >= MAX_SKIPS_BEFORE_FIRST_SAMPLE:
                    raise RuntimeError(
                        f"the first {skipped_before_first} samples read on rank {self.rank} were all skipped "
                        f"({counter.as_dict()}); the shards look unusable: check their contents; "
                        f"worst shards: {counter.worst_shards()}"
                    )
            self._check_skip_rate(start, samples_read, counter, worker)
        self._check_skip_rate(start, samples_read, counter, worker)

    def _check_skip_rate(self, start: tuple[int, int], samples_read: int, counter: SkipCounter, worker: int) -> None:
        """Stop a run whose data is broken: damage skips over samples read, where a damaged sample
        was read too and a bad shard (truncated, unreadable) counts as one more read."""
        if self.max_skip_rate is None:
            return
        damaged = counter.damage_total - start[0]
        seen = samples_read + counter.shard_damage_total - start[1]
        if seen < self.skip_rate_min_samples or damaged <= self.max_skip_rate * seen:
            return
        raise RuntimeError(
            f"data skip rate {damaged / seen:.1%} ({damaged} of {seen} samples/shards read by rank {self.rank}, "
            f"worker {worker}) exceeds data.max_skip_rate={self.max_skip_rate}: the data looks broken. "
            f"Skips by reason: {counter.as_dict()}. Worst shards: {counter.worst_shards()}. "
            f"Fix or leave out those shards, or raise data.max_skip_rate"
        )

    def decode_checked(self, raw: dict, rng: np.random.Generator | None, counter: SkipCounter) -> dict | None:
        """Parse the JSON, choose a caption, apply the metadata filters, then ``decode``; None when skipped."""
        key, url = raw["__key__"], raw["__url__"]
        where = f"{url} {key}"
        metadata: dict = {}
        if "json" in raw:
            try:
                metadata = json.loads(raw["json"])
                if not isinstance(metadata, dict):
                    raise ValueError(f"expected a JSON object, got {type(metadata).__name__}")
            except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                counter.add("invalid_json", f"{where}: {error}", shard=url)
                return None
        candidates = caption_candidates(raw.get("txt"), metadata)
        if not candidates:
            counter.add("missing_caption", where, shard=url)
            return None
        caption = choose_caption(candidates, rng)
        reason = self.filters.rejects_metadata(metadata, caption)
        if reason is not None:
            counter.add(reason, where, shard=url)
            return None
        sample = self.decode(raw, metadata, rng, counter)
        if sample is None:
            return None
        if rng is not None and self.caption_dropout_prob > 0 and rng.random() < self.caption_dropout_prob:
            caption = ""
        return {**sample, "caption": caption, "key": key}

    def decode(self, raw: dict, metadata: dict, rng: np.random.Generator | None, counter: SkipCounter) -> dict | None:
        """The tensors of one raw tar sample; None (counted) when it cannot be used. Subclasses define it."""
        raise NotImplementedError


def _mixed(streams: list[Iterator[dict]], weights: list[float], rng: np.random.Generator) -> Iterator[dict]:
    """Endless streams mixed sample by sample: each next sample comes from stream i with probability weights[i]."""
    while True:
        yield next(streams[int(rng.choice(len(streams), p=weights))])


def _buffer_shuffle(samples: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Yield a random member of a buffer of ``buffer_size`` samples, refilled from the stream."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = int(rng.integers(buffer_size))
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _attach_skip_counts(samples: Iterator[dict], counter: SkipCounter) -> Iterator[dict]:
    """Give each sample ``"skipped"``: the counts made since the previous sample was yielded.
    Holds one sample back, so skips after the last good sample still reach the last one."""
    pending = None
    for sample in samples:
        if pending is not None:
            pending["skipped"] = counter.take_new()
            yield pending
        pending = sample
    if pending is not None:
        pending["skipped"] = counter.take_new()
        yield pending
