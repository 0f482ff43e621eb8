"""Encoding image shards once into latent shards (``ldm.data.latents`` reads them): each input shard gives one
output shard of the same name with the same keys, captions and JSON, holding the frozen VAE's posterior mean
and std (so training still samples) and optionally the text encoder's states.

A shard is written under a temporary name and renamed when whole, so finished outputs mark what a re-run
skips; an unreadable input shard writes nothing (a re-run retries it). ``latents.json`` records the
settings, and a folder written with others is refused. ``python -m ldm.tools.precompute_latents`` is the
command over ``precompute_latents``; ``ldm.data.encoded`` runs it on the built-in set with the model in training.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch import nn

from ldm.atomic import atomic_write
from ldm.data.buckets import Bucket
from ldm.data.filters import MetadataFilters
from ldm.data.latents import MANIFEST_NAME, latent_sample_files
from ldm.data.shards import ImageTextDataset
from ldm.data.skips import SkipCounter
from ldm.data.tars import SHARD_MTIME, expand_shards

logger = logging.getLogger(__name__)


def output_name(url: str) -> str:
    """The output shard's file name: the input's ``NAME.tar`` (also inside a ``pipe:`` command)."""
    names = re.findall(r"([^/\s'\"]+\.tar)(?:\b|$)", url)
    if not names:
        raise ValueError(f"cannot name an output shard for {url!r}: no NAME.tar in it")
    return names[-1]


def part_range(num_items: int, part: int, num_parts: int) -> range:
    """The ``part``-th of ``num_parts`` contiguous, near-equal ranges of ``num_items``."""
    if not 0 <= part < num_parts:
        raise ValueError(f"--part {part} must lie in [0, --num-parts {num_parts})")
    return range(num_items * part // num_parts, num_items * (part + 1) // num_parts)


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``latents.json``, or check that the existing one says the same (no mixing of VAEs)."""
    path = out_dir / MANIFEST_NAME
    if path.exists():
        existing = json.loads(path.read_text())
        differing = sorted(key for key in {*existing, *manifest} if existing.get(key) != manifest.get(key))
        if differing:
            shown = "; ".join(f"{key}: {existing.get(key)!r} there, {manifest.get(key)!r} now" for key in differing)
            raise ValueError(f"{path} was written with other settings ({shown}); use another --out-dir, or the "
                             f"same VAE, VAE weights, text encoder and resolution")
        return
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True))


@torch.no_grad()
def encode_text(text_encoder: nn.Module | None, captions: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(text states (B, L, D), pooled embedding (B, P)) of the captions; the pooled one only for a conditioner
    that uses one (SDXL: several towers' states concatenated, one tower's pooled embedding)."""
    if text_encoder is None:
        return None, None
    if getattr(text_encoder, "pooled_dim", 0) and hasattr(text_encoder, "text_encoders"):
        return text_encoder.encode(captions)
    return text_encoder(captions), None


def encode_shard(
    url: str,
    target: Path,
    vae: nn.Module,
    resolution: int,
    batch_size: int,
    device: torch.device,
    text_encoder: nn.Module | None = None,
    filters: MetadataFilters | None = None,
    autocast_dtype: torch.dtype | None = None,
    buckets: list[Bucket] | None = None,
) -> SkipCounter:
    """Encode one image shard into ``target`` (written whole or not at all); returns its skip counts.
    Nothing is written when the shard could not be opened (``unreadable_shard``)."""
    counter = SkipCounter()
    dataset = ImageTextDataset(url, resolution, train=False, keep_metadata=True, skip_counter=counter, rank=0,
                               world_size=1, filters=filters, buckets=buckets, batch_size=batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with atomic_write(target) as temporary:
        with wds.TarWriter(str(temporary), encoder=False, mtime=SHARD_MTIME) as writer:
            for batch in loader:
                with autocast:
                    posterior = vae.encode(batch["image"].to(device))
                    text_states, text_pooled = encode_text(text_encoder, batch["caption"])
                for index, key in enumerate(batch["key"]):
                    metadata = {**batch["json"][index], "original_size": batch["original_size"][index].tolist(),
                                "crop_coords": batch["crop_coords"][index].tolist(),
                                "target_size": batch["target_size"][index].tolist(), "resolution": resolution}
                    writer.write(latent_sample_files(
                        key, posterior.mean[index], posterior.std[index], batch["caption"][index], metadata,
                        text_states[index] if text_states is not None else None,
                        text_pooled[index] if text_pooled is not None else None,
                    ))
        if counter.samples_skipped_by_reason["unreadable_shard"]:
            temporary.unlink()  # so that a re-run retries this shard
    return counter


def precompute_latents(
    shards: str | Sequence[str],
    out_dir: str | Path,
    vae: nn.Module,
    resolution: int,
    manifest: dict[str, Any],
    batch_size: int = 32,
    part: int = 0,
    num_parts: int = 1,
    device: str | torch.device = "cpu",
    text_encoder: nn.Module | None = None,
    filters: MetadataFilters | None = None,
    autocast_dtype: torch.dtype | None = None,
    buckets: list[Bucket] | None = None,
) -> dict[str, Any]:
    """Encode this part's range of ``shards`` into ``out_dir``; returns a summary
    ``{"written", "already_done", "failed": [urls], "skipped": {reason: count}}``."""
    urls = expand_shards(shards)
    names = [output_name(url) for url in urls]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"several input shards share the output names {duplicates[:3]}; give one source per "
                         f"--out-dir, or shards with distinct file names")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(out_dir, manifest)
    device = torch.device(device)
    vae.to(device).eval().requires_grad_(False)
    if text_encoder is not None:
        text_encoder.to(device).eval().requires_grad_(False)
    summary: dict[str, Any] = {"written": 0, "already_done": 0, "failed": [], "skipped": {}}
    skipped = SkipCounter(warn_limit=0)
    for index in part_range(len(urls), part, num_parts):
        target = out_dir / names[index]
        if target.exists():
            summary["already_done"] += 1
            continue
        started = time.perf_counter()
        counter = encode_shard(urls[index], target, vae, resolution, batch_size, device, text_encoder, filters,
                               autocast_dtype, buckets)
        skipped.update(counter.as_dict())
        if target.exists():
            summary["written"] += 1
            logger.info("%s -> %s in %.1f s (skipped: %s)", urls[index], target, time.perf_counter() - started,
                        counter.as_dict())
        else:
            summary["failed"].append(urls[index])
    summary["skipped"] = skipped.as_dict()
    return summary
