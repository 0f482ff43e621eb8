"""WebDataset pipeline for LAION-style image-text shards (img2dataset layout: KEY.jpg|png|webp, KEY.txt, KEY.json).

The stages are written out here rather than chained on ``wds.WebDataset``, because this module
must decide exactly which shards each rank and worker reads (tests prove it), and must turn every
kind of bad input into a counted skip with a named reason; webdataset supplies the stream opener
(``gopen``: local files, ``pipe:`` commands, http(s), s3/gs via their CLIs) and the tar member
naming (``base_plus_ext``).

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
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence

import braceexpand
import numpy as np
import torch
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from ldm.data.buckets import BUCKET_CROPS, Bucket, BucketBatcher, nearest_bucket
from ldm.data.filters import MetadataFilters, caption_candidates, choose_caption
from ldm.data.resume import StreamPosition, batches_per_worker, load_indexed_sample, tar_index
from ldm.data.skips import SkipCounter
from ldm.data.transforms import decode_rgb, open_image, resize_and_crop, to_tensor
from ldm.ranks import rank_and_world_size

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MODES = ("resampled", "exactly_once")
# A worker that skips this many samples in a row, before yielding any, is reading unusable data.
MAX_SKIPS_BEFORE_FIRST_SAMPLE = 10_000
# The modification time ldm writes into shard members: an integer keeps tarfile from adding a pax header to
# every member (a float time needs one), which halves the headers a reader parses; a fixed one makes the same
# input give byte-identical shards.
SHARD_MTIME = 0

__all__ = ["SHARD_MTIME", "ImageTextDataset", "ShardStream", "collate_samples", "expand_shards", "image_text_dataset",
           "read_tar_samples", "resize_and_crop"]


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard specs -> list of URLs. A spec is a brace pattern (``/data/{00000..00099}.tar``,
    ``pipe:aws s3 cp s3://bucket/{000..999}.tar -``); a string may join several with ``::``
    (webdataset's convention), or pass a list."""
    specs = shards.split("::") if isinstance(shards, str) else list(shards)
    urls = [url for spec in specs if spec.strip() for url in braceexpand.braceexpand(spec.strip())]
    if not urls:
        raise ValueError(f"shards={shards!r} names no shard; give a path pattern like '/data/{{00000..00099}}.tar'")
    return urls


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


class _TailRecorder:
    """A read-only stream wrapper that keeps the last 512 bytes read (to see a tar's end marker)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if data:
            self.tail = (self.tail + data)[-tarfile.BLOCKSIZE :]
        return data

    def close(self) -> None:
        self.stream.close()


def read_tar_samples(
    url: str, skip_counter: SkipCounter, count_shard_errors: bool = True
) -> Iterator[dict[str, bytes | str]]:
    """Raw samples of one tar shard: ``{"__key__", "__url__", ext: bytes, ...}``, files grouped by key.

    An unreadable shard (missing, not a tar) is skipped as ``unreadable_shard``; a read error part
    way (truncated or damaged tar) ends the shard as ``truncated_tar`` and drops the sample whose
    file it cut (a sample whose files were all read before the cut is still yielded).
    ``count_shard_errors=False``: such errors are not counted (another reader of the shard counts them).
    """

    def shard_error(reason: str, error: Exception) -> None:
        if count_shard_errors:
            skip_counter.add(reason, f"{url}: {type(error).__name__}: {error}", shard=url)

    try:
        stream = _TailRecorder(gopen(url))
    except Exception as error:  # missing file, no permission, failed command...
        shard_error("unreadable_shard", error)
        return
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*")
    except Exception as error:  # not a tar archive
        shard_error("unreadable_shard", error)
        _close_quietly(stream)
        return
    current: dict | None = None
    member_being_read = None
    abandoned = False
    try:
        for member in archive:
            if not member.isreg():
                continue
            key, extension = base_plus_ext(member.name)
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            member_being_read = member.name
            current[extension.lower()] = archive.extractfile(member).read()
            member_being_read = None
            archive.members = []  # stream mode would otherwise keep every header in memory
        # tarfile takes a cut at a 512-byte block boundary for the end of the archive (common when a
        # copy stops between buffers); a whole plain tar ends in zero blocks, so check for them.
        while stream.read(1 << 16):
            pass
        if getattr(archive.fileobj, "comptype", None) == "tar" and stream.tail != bytes(tarfile.BLOCKSIZE):
            raise tarfile.ReadError("the archive ends without its end-of-archive blocks")
    except GeneratorExit:  # the consumer stopped reading (e.g. at the end of an epoch)
        abandoned = True
        raise
    except Exception as error:
        shard_error("truncated_tar", error)
        if member_being_read is not None:
            current = None  # one of its files was cut; the files of a sample read whole are kept
    finally:
        if abandoned:
            _close_quietly(stream)  # a pipe: command cut short would report a failure that is none
        else:
            try:
                stream.close()
            except Exception as error:  # a pipe: command that failed reports it on close
                shard_error("unreadable_shard", error)
    if current is not None:
        yield current


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:
        pass


def _shard_samples(url: str, counter: SkipCounter) -> Iterator[dict]:
    """The raw samples of one shard. A local, plain, undamaged tar gives header-only entries (``tar_index``),
    whose files ``_decoded`` reads when it needs them: a resumed stream walks over consumed samples without
    reading them, and a read costs a seek instead of tarfile's header parsing. Other shards (remote, compressed,
    damaged) are read by ``read_tar_samples``, which counts their damage."""
    index = tar_index(url)
    if index is None:
        yield from read_tar_samples(url, counter)
        return
    yield from index


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
                for raw in _shard_samples(urls[index], counter):
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


def collate_samples(samples: list[dict]) -> dict:
    """Batch samples: tensors stacked to (B, ...), other fields listed, ``"skipped"`` summed into one
    {reason: count} dict (what the producing worker dropped while reading this batch)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    skipped: Counter[str] = Counter()
    for sample in samples:
        skipped.update(sample.get("skipped") or {})
    batch: dict = {}
    for name in samples[0]:
        if name == "skipped":
            continue
        values = [sample[name] for sample in samples]
        if isinstance(values[0], torch.Tensor) and len({tuple(v.shape) for v in values}) > 1:
            raise ValueError(f"cannot batch {name!r} of shapes {sorted({tuple(v.shape) for v in values})}: samples "
                             f"of several buckets; batch them in the stream (batch_size=...) instead")
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    batch["skipped"] = dict(skipped)
    return batch
