"""WebDataset pipeline for LAION-style image-text shards (img2dataset layout: KEY.jpg|png|webp, KEY.txt, KEY.json).

The stages are written out here rather than chained on ``wds.WebDataset``, because this module
must decide exactly which shards each rank and worker reads (tests prove it), and must turn every
kind of bad input into a counted skip with a named reason; webdataset supplies the stream opener
(``gopen``: local files, ``pipe:``, URLs) and the tar member naming (``base_plus_ext``).

    shards ── split by rank ── split by worker ── tar members grouped by key
      ── (train: endless shuffled passes, shuffle buffer) ── decode, resize, crop, caption dropout
      ── skip counts attached ── (train: cut to the epoch length)

Skip counts travel with the samples: ``sample["skipped"]`` holds what its worker dropped since
its previous sample, and ``collate_samples`` sums them into ``batch["skipped"]``, so the training
process sees the counts of every dataloader worker.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator

import braceexpand
import numpy as np
import torch
from PIL import Image
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from ldm.data.skips import SkipCounter

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# A worker that skips this many samples in a row, before yielding any, is reading unusable data.
MAX_SKIPS_BEFORE_FIRST_SAMPLE = 10_000


def expand_shards(shards: str | list[str]) -> list[str]:
    """Shard specs -> list of URLs. A spec is a brace pattern (``/data/{00000..00099}.tar``); a string
    may join several with ``::`` (webdataset's convention), or pass a list."""
    specs = shards.split("::") if isinstance(shards, str) else list(shards)
    urls = [url for spec in specs if spec.strip() for url in braceexpand.braceexpand(spec.strip())]
    if not urls:
        raise ValueError(f"shards={shards!r} names no shard; give a path pattern like '/data/{{00000..00099}}.tar'")
    return urls


def distributed_rank_and_world_size() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else env RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
            skip_counter.add(reason, f"{url}: {type(error).__name__}: {error}")

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


def resize_and_crop(
    image: Image.Image, resolution: int, rng: np.random.Generator | None
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the short side to ``resolution`` (bicubic, antialiased) and crop a square of that side:
    at random when ``rng`` is given, else centred. Returns the crop and its (top, left) in the resized image."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    width, height = size
    if rng is not None:
        top, left = int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))
    else:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution)), (top, left)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels are put on white, as a browser shows them, not on whatever colour they hold.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class ImageTextDataset(torch.utils.data.IterableDataset):
    """Image-caption samples from WebDataset shards; see ``image_text_dataset``."""

    def __init__(
        self,
        shards: str | list[str],
        resolution: int,
        train: bool,
        caption_dropout_prob: float = 0.0,
        shuffle_buffer: int = 1000,
        epoch_length: int | None = None,
        seed: int = 0,
        skip_counter: SkipCounter | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if resolution <= 0:
            raise ValueError(f"resolution={resolution} must be a positive number of pixels, e.g. 256")
        if not 0.0 <= caption_dropout_prob <= 1.0:
            raise ValueError(f"caption_dropout_prob={caption_dropout_prob} must lie in [0, 1] (0.1 is usual)")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 0 (0 turns the sample shuffle off)")
        if epoch_length is not None and epoch_length <= 0:
            raise ValueError(f"epoch_length={epoch_length} must be positive (samples per rank), or None for endless")
        self.urls = expand_shards(shards)
        if (rank is None) != (world_size is None):
            raise ValueError(f"give both rank and world_size or neither (got rank={rank}, world_size={world_size})")
        if rank is None:
            rank, world_size = distributed_rank_and_world_size()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if train and len(self.urls) < world_size:
            raise ValueError(
                f"{len(self.urls)} training shard(s) cannot give each of {world_size} ranks its own shards; "
                f"write at least {world_size} shards (e.g. fewer samples per shard) or train on fewer ranks"
            )
        self.resolution = resolution
        self.train = train
        self.caption_dropout_prob = caption_dropout_prob if train else 0.0
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.epoch_length = epoch_length if train else None
        self.seed = seed
        self.skip_counter = skip_counter
        self.rank, self.world_size = rank, world_size
        self.epoch = 0  # advanced by each __iter__ in the process that runs it (persistent workers keep it)

    def set_epoch(self, epoch: int) -> None:
        """Choose the random stream of the next iteration (for non-persistent workers, which start from a copy)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_id_and_count()
        rng = np.random.default_rng([self.seed, self.rank, worker, self.epoch])
        self.epoch += 1
        counter = self.skip_counter if self.skip_counter is not None else SkipCounter()
        counter.take_new()  # counts from an earlier iteration were reported there
        if self.train:
            samples = self._train_samples(worker, num_workers, rng, counter)
        else:
            samples = self._eval_samples(worker, num_workers, counter)
        samples = _attach_skip_counts(samples, counter)
        if self.epoch_length is not None:
            per_worker = self.epoch_length // num_workers + (worker < self.epoch_length % num_workers)
            samples = itertools.islice(samples, per_worker)
        yield from samples

    def _train_samples(
        self, worker: int, num_workers: int, rng: np.random.Generator, counter: SkipCounter
    ) -> Iterator[dict]:
        rank_urls = self.urls[self.rank :: self.world_size]
        # Workers take disjoint shards when the rank has enough; else each draws its own random
        # order over all of them (seeded by worker), which is as good for an endless stream.
        worker_urls = rank_urls[worker::num_workers] if len(rank_urls) >= num_workers else rank_urls
        raw = self._endless_passes(worker_urls, rng, counter)
        if self.shuffle_buffer > 1:
            raw = _buffer_shuffle(raw, self.shuffle_buffer, rng)
        return self._decoded(raw, rng, counter)

    def _endless_passes(self, urls: list[str], rng: np.random.Generator, counter: SkipCounter) -> Iterator[dict]:
        while True:
            samples_read = 0
            for index in rng.permutation(len(urls)):
                for raw in read_tar_samples(urls[index], counter):
                    samples_read += 1
                    yield raw
            if samples_read == 0:
                shown = ", ".join(urls[:3]) + (", ..." if len(urls) > 3 else "")
                raise RuntimeError(
                    f"rank {self.rank} could read no sample from any of its shards ({shown}); "
                    f"skips so far: {counter.as_dict()}; check that the shard files are readable tar archives"
                )

    def _eval_samples(self, worker: int, num_workers: int, counter: SkipCounter) -> Iterator[dict]:
        # Exactly once over all ranks and workers: split by shard where there are enough shards,
        # else split the samples of the shared shards.
        urls, rank_part, rank_parts = _split(self.urls, self.rank, self.world_size)
        urls, worker_part, worker_parts = _split(urls, worker, num_workers)
        part, num_parts = rank_part * worker_parts + worker_part, rank_parts * worker_parts
        if not urls:
            return iter(())

        def raw_samples() -> Iterator[dict]:
            index = 0
            for url in urls:
                for raw in read_tar_samples(url, counter, count_shard_errors=part == 0):
                    if index % num_parts == part:
                        yield raw
                    index += 1

        return self._decoded(raw_samples(), None, counter)

    def _decoded(
        self, raw_samples: Iterator[dict], rng: np.random.Generator | None, counter: SkipCounter
    ) -> Iterator[dict]:
        skipped_before_first = 0
        for raw in raw_samples:
            sample = self.decode(raw, rng, counter)
            if sample is not None:
                skipped_before_first = -1
                yield sample
            elif skipped_before_first >= 0:
                skipped_before_first += 1
                if skipped_before_first >= MAX_SKIPS_BEFORE_FIRST_SAMPLE:
                    raise RuntimeError(
                        f"the first {skipped_before_first} samples read on rank {self.rank} were all skipped "
                        f"({counter.as_dict()}); the shards look unusable: check their contents"
                    )

    def decode(self, raw: dict, rng: np.random.Generator | None, counter: SkipCounter) -> dict | None:
        """One raw tar sample -> a training sample; None (counted and warned) when it cannot be used.
        ``rng`` given: random crop and caption dropout; None: centre crop, caption kept."""
        key = raw["__key__"]
        where = f"{raw['__url__']} {key}"
        metadata = {}
        if "json" in raw:
            try:
                metadata = json.loads(raw["json"])
                if not isinstance(metadata, dict):
                    raise ValueError(f"expected a JSON object, got {type(metadata).__name__}")
            except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                counter.add("invalid_json", f"{where}: {error}")
                return None
        caption = raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else ""
        if not caption and isinstance(metadata.get("caption"), str):
            caption = metadata["caption"].strip()
        if not caption:
            counter.add("missing_caption", where)
            return None
        extension = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if extension is None:
            counter.add("missing_image", f"{where} has no {'/'.join(IMAGE_EXTENSIONS)} file")
            return None
        try:
            with Image.open(io.BytesIO(raw[extension])) as image:
                original_size = (image.height, image.width)
                # JPEG: decode at a power-of-two reduction that stays at or above the target size.
                image.draft("RGB", (self.resolution, self.resolution))
                image = _to_rgb(image)
        except Exception as error:  # PIL raises many types for corrupt or truncated files
            counter.add("corrupt_image", f"{where}: {type(error).__name__}: {error}")
            return None
        image, crop_coords = resize_and_crop(image, self.resolution, rng)
        if rng is not None and self.caption_dropout_prob > 0 and rng.random() < self.caption_dropout_prob:
            caption = ""
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return {
            "image": pixels.float() / 127.5 - 1.0,
            "caption": caption,
            "key": key,
            "original_size": torch.tensor(original_size, dtype=torch.long),
            "crop_coords": torch.tensor(crop_coords, dtype=torch.long),
        }


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
    shards: str | list[str],
    resolution: int,
    train: bool,
    caption_dropout_prob: float = 0.0,
    shuffle_buffer: int = 1000,
    epoch_length: int | None = None,
    seed: int = 0,
    skip_counter: SkipCounter | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> ImageTextDataset:
    """Image-caption samples from WebDataset shards, as an IterableDataset for a DataLoader.

    Each sample: ``{"image": (3, resolution, resolution) float in [-1, 1], "caption": str, "key": str,
    "original_size": (2,) long (h, w) before resizing, "crop_coords": (2,) long (top, left) of the crop
    in the resized image, "skipped": {reason: count} dropped by this worker since its previous sample}``.
    Images: short side resized to ``resolution``, then a square crop (random when ``train``, else centred).
    Captions: ``KEY.txt``, else ``"caption"`` in ``KEY.json``, stripped.

    ``train=True``: this rank's own shards (``shards[rank::world_size]``, disjoint across ranks; an
    error if there are fewer shards than ranks), read in endless reshuffled passes by each worker,
    through a ``shuffle_buffer``-sample shuffle, with caption dropout, cut to ``epoch_length`` samples
    per rank (the same number of batches on every rank, so DDP ranks stay in step; None: endless).
    Random choices are seeded by (seed, rank, worker, epoch) and reproducible.
    ``train=False``: every sample once over all ranks and workers, in shard order, no randomness.

    Bad data never stops the stream: corrupt images, missing captions, invalid JSON, truncated tars
    and unreadable shards are skipped, counted in ``skip_counter`` (in the process that iterates; with
    dataloader workers use ``batch["skipped"]`` from ``collate_samples``) and the first few of each
    reason are logged. ``rank``/``world_size`` default to torch.distributed, else env RANK/WORLD_SIZE,
    read when the dataset is built.
    """
    return ImageTextDataset(
        shards, resolution, train, caption_dropout_prob, shuffle_buffer, epoch_length, seed, skip_counter,
        rank, world_size,
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
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    batch["skipped"] = dict(skipped)
    return batch
