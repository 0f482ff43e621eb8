"""Writing image-caption shards in img2dataset's layout from images on disk: ``OUT/00000.tar, 00001.tar, ...``,
each sample ``KEY.jpg|png|webp`` (the original bytes; other formats re-encoded as JPEG), ``KEY.txt`` (caption)
and ``KEY.json`` (key, caption, status, width, height, original_width, original_height, url = the source path,
any extra fields of the record), KEY = 5-digit shard index + index in the shard. ``python -m
ldm.tools.make_shards`` is the command over these.
"""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image

from ldm.atomic import atomic_write, refuse_existing
from ldm.data.tars import SHARD_MTIME

FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def folder_records(images_dir: str | Path) -> Iterator[dict]:
    """(path, caption, extra metadata) records of the images under ``images_dir`` with sidecar captions,
    sorted by path; an image without a ``.txt`` gets caption None (skipped later, counted)."""
    for path in sorted(p for p in Path(images_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption_file, metadata_file = path.with_suffix(".txt"), path.with_suffix(".json")
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.exists() else None
        extra = {}
        if metadata_file.exists():
            try:
                extra = json.loads(metadata_file.read_text())
            except ValueError:
                extra = {}
        yield {"path": path, "caption": caption, "extra": extra if isinstance(extra, dict) else {}}


def table_records(rows: Iterable[dict], base_dir: Path, path_column: str, caption_column: str) -> Iterator[dict]:
    """Records from table rows (CSV or Parquet); relative paths are taken from ``base_dir``."""
    for number, row in enumerate(rows):
        if path_column not in row or caption_column not in row:
            raise ValueError(f"row {number} has columns {sorted(row)}; set --path-column and --caption-column "
                             f"(now {path_column!r}, {caption_column!r})")
        path = Path(str(row[path_column]))
        caption = row[caption_column]
        extra = {k: v for k, v in row.items() if k not in (path_column, caption_column)}
        yield {"path": path if path.is_absolute() else base_dir / path,
               "caption": str(caption).strip() if caption is not None else None, "extra": extra}


def image_entry(path: Path) -> tuple[str, bytes, int, int]:
    """(extension, bytes, width, height) of an image file: original bytes for JPEG/PNG/WebP, else JPEG."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes the whole file: a truncated or corrupt image fails here, not in training
        width, height = image.size
        extension = FORMAT_EXTENSIONS.get(image.format)
        if extension is None:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=95)
            data, extension = buffer.getvalue(), "jpg"
    return extension, data, width, height


def existing_shards(out_dir: Path) -> list[Path]:
    """The shards a previous run wrote into ``out_dir`` (``NNNNN.tar``)."""
    return sorted(p for p in out_dir.glob("*.tar") if p.stem.isdigit() and len(p.stem) == 5) if out_dir.is_dir() else []


def write_shards(records: Iterable[dict], out_dir: str | Path, samples_per_shard: int = 10_000,
                 overwrite: bool = False) -> dict:
    """Write records to ``out_dir/{00000..}.tar``; returns ``{"samples", "shards", "skipped": {reason: count}}``.

    A folder that holds shards already is refused (a new set would replace some of them and leave the rest);
    ``overwrite`` removes them first."""
    if samples_per_shard <= 0:
        raise ValueError(f"--samples-per-shard {samples_per_shard} must be positive")
    out_dir = Path(out_dir)
    previous = existing_shards(out_dir)
    if previous:
        refuse_existing(out_dir, "--overwrite", overwrite)  # holds shards: a new set would mix with them
        for shard in previous:
            shard.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(samples_per_shard - 1)))
    skipped: Counter[str] = Counter()
    entries = readable_entries(records, skipped)
    written, shard_paths = 0, []
    for shard in itertools.count():
        first = next(entries, None)
        if first is None:
            break
        target = out_dir / f"{shard:05d}.tar"
        with atomic_write(target) as temporary, wds.TarWriter(str(temporary), encoder=False, mtime=SHARD_MTIME) as writer:
            for index, (record, extension, data, width, height) in enumerate(
                    itertools.chain([first], itertools.islice(entries, samples_per_shard - 1))):
                key = f"{shard:05d}{index:0{digits}d}"
                metadata = {**record["extra"], "key": key, "caption": record["caption"], "status": "success",
                            "url": str(record["path"]), "width": width, "height": height,
                            "original_width": width, "original_height": height}
                writer.write({"__key__": key, extension: data, "txt": record["caption"].encode(),
                              "json": json.dumps(metadata, sort_keys=True, default=str).encode()})
                written += 1
        shard_paths.append(target)
    return {"samples": written, "shards": len(shard_paths), "skipped": dict(skipped),
            "shard_spec": str(out_dir / f"{{00000..{max(len(shard_paths) - 1, 0):05d}}}.tar")}


def readable_entries(records: Iterable[dict], skipped: Counter[str]) -> Iterator[tuple[dict, str, bytes, int, int]]:
    """(record, extension, bytes, width, height) of the records with a caption and a readable image; the
    others are counted in ``skipped`` by reason."""
    for record in records:
        if not record["caption"]:
            skipped["missing_caption"] += 1
            continue
        try:
            entry = image_entry(Path(record["path"]))
        except FileNotFoundError:
            skipped["missing_image"] += 1
            continue
        except Exception:  # PIL raises many types for corrupt files
            skipped["corrupt_image"] += 1
            continue
        yield (record, *entry)
