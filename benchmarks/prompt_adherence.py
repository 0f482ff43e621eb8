"""Prompt adherence of a trained demo model, measured by pixel statistics.

For every (shape, colour, background) caption of the built-in data set, samples N images with
held-out seeds, classifies each image's shape, colour and background with
``ldm.data.synthetic.classify_scene`` (no learned model) and reports how often each fact matches
the prompt. The same classifier is run on real validation images first, so the table shows how
far the measurement itself can be trusted.

    python benchmarks/prompt_adherence.py [--ckpt PATH] [--images-per-prompt 8] [--steps 50]

Prints a table and writes benchmarks/results/prompt_adherence.json (+ a sample grid PNG).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.checkpoints import load_training_checkpoint  # noqa: E402
from ldm.data.shards import collate_samples, image_text_dataset  # noqa: E402
from ldm.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, caption_for, classify_scene, parse_caption  # noqa: E402
from ldm.visualization import captioned_grid, to_pil_images  # noqa: E402

FACTS = ("colour", "shape", "background")


def newest_checkpoint(pattern: str) -> Path:
    """The most recently written checkpoint matching a glob pattern."""
    matches = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not matches:
        raise SystemExit(f"no checkpoint matches {pattern}; train one first (make demo) or pass --ckpt")
    return Path(matches[-1])


def adherence(images: torch.Tensor, captions: list[str]) -> dict[str, list[bool]]:
    """For each fact, whether each image (N, 3, H, W) in [0, 1] shows what its caption says."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for image, caption in zip(images, captions):
        wanted = parse_caption(caption)
        seen = classify_scene(image)
        for fact in FACTS:
            hits[fact].append(seen[fact] == wanted[fact])
        hits["all"].append(all(seen[fact] == wanted[fact] for fact in FACTS))
    return hits


def real_image_adherence(val_shards: str, resolution: int, limit: int) -> dict[str, list[bool]]:
    """The classifier's agreement with the captions of real validation images."""
    dataset = image_text_dataset(val_shards, resolution=resolution, train=False)
    images, captions = [], []
    for sample in dataset:
        images.append((sample["image"] + 1) / 2)
        captions.append(sample["caption"])
        if len(images) >= limit:
            break
    return adherence(torch.stack(images), captions)


def rate(values: list[bool]) -> float:
    return sum(values) / max(1, len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="Lightning checkpoint (default: newest demo run's last.ckpt)")
    parser.add_argument("--runs-glob", default=str(ROOT / "outputs/train/demo/*/checkpoints/last.ckpt"))
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--seed", type=int, default=100_000, help="first seed; held out from the training grid's seeds")
    parser.add_argument("--batch-size", type=int, default=216)
    parser.add_argument("--val-shards", default=None, help="real images to check the classifier on (default: the built-in val set)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/prompt_adherence.json"))
    args = parser.parse_args()

    ckpt = Path(args.ckpt) if args.ckpt else newest_checkpoint(args.runs_glob)
    module = load_training_checkpoint(ckpt)
    resolution = int(module.model_config["vae"]["resolution"])
    captions = [caption_for(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, BACKGROUNDS)]
    prompts = [caption for caption in captions for _ in range(args.images_per_prompt)]
    seeds = [args.seed + i for i in range(len(prompts))]

    started = time.perf_counter()
    images = module.pipeline(use_ema=True)(
        prompts, height=resolution, width=resolution, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, sampler=args.sampler, seed=seeds, batch_size=args.batch_size,
    )
    sampling_seconds = time.perf_counter() - started
    generated = adherence(images, prompts)

    val_shards = args.val_shards
    if val_shards is None:
        matches = sorted(glob.glob(str(ROOT / f"data/synthetic-{resolution}px-*/val-*.tar")))
        val_shards = matches[0] if matches else None
    real = real_image_adherence(val_shards, resolution, limit=512) if val_shards else None

    print(f"\nPrompt adherence: {ckpt}")
    print(f"{len(captions)} prompts x {args.images_per_prompt} images, {args.sampler} {args.steps} steps, "
          f"guidance {args.guidance_scale}, {sampling_seconds:.1f} s to sample\n")
    print(f"{'images':<12}{'colour':>9}{'shape':>9}{'background':>12}{'all three':>11}{'n':>7}")
    rows = {"generated": generated} | ({"real (val)": real} if real else {})
    for name, hits in rows.items():
        print(f"{name:<12}" + "".join(f"{rate(hits[f]):>{w}.1%}" for f, w in zip((*FACTS, "all"), (9, 9, 12, 11)))
              + f"{len(hits['all']):>7}")
    per_value = {}
    for fact, values in (("colour", COLOURS), ("shape", SHAPES), ("background", BACKGROUNDS)):
        for value in values:
            mask = [parse_caption(p)[fact] == value for p in prompts]
            per_value[f"{fact}={value}"] = rate([h for h, m in zip(generated[fact], mask) if m])
    print("\nper prompt value (generated): " + ", ".join(f"{k} {v:.0%}" for k, v in per_value.items()))

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    first_of_each = list(range(0, len(prompts), args.images_per_prompt))
    grid = captioned_grid([to_pil_images(images[i : i + 1])[0] for i in first_of_each],
                          [prompts[i] for i in first_of_each], columns=9, tile_size=96)
    grid_path = output.with_suffix(".png")
    grid.save(grid_path)
    result = {
        "checkpoint": str(ckpt),
        "settings": {"images_per_prompt": args.images_per_prompt, "num_prompts": len(captions), "sampler": args.sampler,
                     "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale, "first_seed": args.seed},
        "generated": {fact: rate(generated[fact]) for fact in (*FACTS, "all")},
        "real_validation_images": {fact: rate(real[fact]) for fact in (*FACTS, "all")} if real else None,
        "generated_per_value": per_value,
        "num_images": len(prompts),
        "sampling_seconds": sampling_seconds,
        "grid": str(grid_path),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    output.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {output} and {grid_path}")


if __name__ == "__main__":
    main()
