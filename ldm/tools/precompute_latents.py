"""Encode image shards with the frozen VAE (and optionally the text encoder) into latent shards.

    python -m ldm.tools.precompute_latents --shards '/data/laion/{00000..09999}.tar' \
        --out-dir /data/laion-latents-256 --vae configs/model/vae/sd.yaml --vae-weights sd-vae.safetensors \
        --resolution 256 --batch-size 64 --device cuda [--text-encoder configs/model/text_encoder/openclip_vit_h14.yaml]

Each input shard gives one output shard of the same name with the same keys, captions and JSON
(see ``ldm.data.latents``): the posterior mean and std (so training still samples), centre crop at
``--resolution``, or with ``--buckets`` (JSON: ``'[[256, 256], [192, 320]]'`` or
``'{"pixel_budget": 65536, "side_step": 64, "max_aspect_ratio": 2}'``, as ``data.buckets``) at the
bucket nearest each image's aspect ratio, batched by bucket. Split over processes or GPUs by shard ranges with ``--num-parts N --part I``
(default: env WORLD_SIZE and RANK; the device defaults to cuda:LOCAL_RANK); part I takes the I-th
contiguous range. Re-running resumes: finished output shards are skipped, each is written under a
temporary name and renamed when whole. An unreadable input shard writes nothing (so a re-run
retries it) and makes the exit status 1. Train on the result with ``data=latents``.

``--builtin DATA_DIR`` instead of ``--shards`` encodes the built-in set (``ldm.data.synthetic``, written there
first if missing, with ``configs/data/synthetic.yaml``'s sizes at ``--resolution``): its train and validation
shards, which ``data=demo_latents`` reads (``make demo`` runs this once).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
import webdataset as wds
from omegaconf import OmegaConf
from torch import nn

from ldm.atomic import atomic_write
from ldm.checkpoints import load_weights
from ldm.data.buckets import Bucket, resolve_buckets
from ldm.data.filters import MetadataFilters
from ldm.data.latents import MANIFEST_NAME, latent_sample_files
from ldm.data.shards import SHARD_MTIME, ImageTextDataset, expand_shards
from ldm.data.skips import SkipCounter
from ldm.data.synthetic import ensure_synthetic_dataset
from ldm.interchange.frozen_files import file_sha256
from ldm.ranks import rank_and_world_size
from ldm.tools.cli import ToolParser, nonnegative_int, positive_int, run_cli

logger = logging.getLogger("ldm.tools.precompute_latents")


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


def build(config_path: str | None, weights: str | None = None) -> tuple[nn.Module | None, dict | None, dict]:
    """(module, its config as a dict, its weights file's metadata) from a ``_target_`` YAML preset."""
    if config_path is None:
        return None, None, {}
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: no such config file (a preset such as configs/model/vae/sd.yaml)")
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    module = hydra.utils.instantiate(config)
    metadata = load_weights(module, weights) if weights else {}
    return module, config, metadata


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ToolParser(prog="python -m ldm.tools.precompute_latents", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="input shards, brace pattern (or several joined by ::)")
    source.add_argument("--builtin", metavar="DATA_DIR", help="the built-in set under DATA_DIR (train and val)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--vae", required=True, help="VAE config preset, e.g. configs/model/vae/sd.yaml")
    parser.add_argument("--vae-weights", default=None, help="safetensors weights of that VAE")
    parser.add_argument("--text-encoder", default=None, help="text encoder config preset: also store its output")
    parser.add_argument("--text-encoder-weights", default=None)
    parser.add_argument("--resolution", type=positive_int, required=True)
    parser.add_argument("--buckets", default=None, type=json.loads,
                        help="aspect-ratio buckets as data.buckets, in JSON: a list of [height, width] or a mapping")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--num-parts", type=positive_int, default=None, help="default: the launcher's WORLD_SIZE, else 1")
    parser.add_argument("--part", type=nonnegative_int, default=None, help="default: the launcher's RANK, else 0")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when there is a GPU, else cpu")
    parser.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="encode under autocast")
    parser.add_argument("--min-width", type=positive_int, default=None, help="leave out images narrower than this")
    parser.add_argument("--min-height", type=positive_int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rank, world_size = rank_and_world_size()
    part = rank if args.part is None else args.part
    num_parts = world_size if args.num_parts is None else args.num_parts

    shards = args.shards or "::".join(ensure_synthetic_dataset(args.builtin, resolution=args.resolution))
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    buckets = resolve_buckets(args.buckets, args.resolution, "--buckets")
    vae, vae_config, vae_metadata = build(args.vae, args.vae_weights)
    text_encoder, text_config, _ = build(args.text_encoder, args.text_encoder_weights)
    manifest = {
        "format": 1, "resolution": args.resolution, "vae": vae_config, "vae_weights": args.vae_weights,
        # what training compares with model.vae_weights (a retrained VAE at the same path is another VAE)
        "vae_sha256": file_sha256(args.vae_weights) if args.vae_weights else None,
        "text_encoder_sha256": file_sha256(args.text_encoder_weights) if args.text_encoder_weights else None,
        "latent_scale_factor": float(vae_metadata["latent_scale_factor"]) if "latent_scale_factor" in vae_metadata
        else None,
        "text_encoder": text_config, "text_encoder_weights": args.text_encoder_weights,
        "buckets": [list(bucket) for bucket in buckets] if buckets is not None else None,
    }
    summary = precompute_latents(
        shards, args.out_dir, vae, args.resolution, manifest, batch_size=args.batch_size, part=part,
        num_parts=num_parts, device=device, text_encoder=text_encoder,
        filters=MetadataFilters(min_width=args.min_width, min_height=args.min_height),
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.autocast], buckets=buckets,
    )
    print(json.dumps(summary, indent=2))
    if summary["failed"]:
        raise SystemExit(f"{len(summary['failed'])} shard(s) could not be read ({summary['failed'][:3]}); "
                         f"re-run the same command to retry them (finished shards are skipped)")
    return summary


if __name__ == "__main__":
    run_cli(main)
