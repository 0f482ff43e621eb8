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
from typing import Any

import hydra
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.checkpoints import load_weights
from ldm.data.buckets import resolve_buckets
from ldm.data.filters import MetadataFilters
from ldm.data.precompute import precompute_latents
from ldm.data.synthetic import ensure_synthetic_dataset
from ldm.interchange.frozen_files import file_sha256
from ldm.ranks import rank_and_world_size
from ldm.tools.cli import ToolParser, nonnegative_int, positive_int, run_cli


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
        # what training compares with model.latents.vae_weights (a retrained VAE at the same path is another VAE)
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
