"""Prompt adherence of a trained demo model, measured by pixel statistics.

For every (shape, colour, background) caption of the built-in data set, samples N images with
held-out seeds, classifies each image's shape, colour and background with
``ldm.data.synthetic.classify_scene`` (no learned model) and reports how often each fact matches
the prompt. The same classifier is run on real validation images first, so the table shows how
far the measurement itself can be trusted.

    python benchmarks/prompt_adherence.py [--model PATH] [--images-per-prompt 8] [--steps 50] [--output FILE]

Prints a table and writes ``prompt_adherence.json`` (+ a grid PNG of the first image per caption) into
the model's run folder, or to ``--output`` (the committed figures: benchmarks/results/).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    default_val_shards, demo_sampling_parser, machine_info, newest_demo_model, real_images, run_folder)
from ldm.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, parse_caption  # noqa: E402
from ldm.evaluation.prompt_adherence import FACTS, adherence, all_demo_captions, hit_rate  # noqa: E402
from ldm.pipeline import TextToImagePipeline  # noqa: E402
from ldm.visualization import captioned_grid, to_pil_images  # noqa: E402


def main() -> None:
    parser = demo_sampling_parser(__doc__, images_per_prompt=8, seed=100_000, output_name=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ddim")
    args = parser.parse_args()

    ckpt = Path(args.model) if args.model else newest_demo_model()
    pipeline = TextToImagePipeline.from_pretrained(ckpt)
    resolution = pipeline.resolution
    captions = all_demo_captions()
    prompts = [caption for caption in captions for _ in range(args.images_per_prompt)]
    seeds = [args.seed + i for i in range(len(prompts))]

    started = time.perf_counter()
    images = pipeline(
        prompts, height=resolution, width=resolution, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, sampler=args.sampler, seed=seeds, batch_size=args.batch_size,
    )
    sampling_seconds = time.perf_counter() - started
    generated = adherence(images, prompts)

    val_shards = args.val_shards or default_val_shards(resolution)
    real = adherence(*real_images(val_shards, resolution, limit=512)) if val_shards else None

    print(f"\nPrompt adherence: {ckpt}")
    print(f"{len(captions)} prompts x {args.images_per_prompt} images, {args.sampler} {args.steps} steps, "
          f"guidance {args.guidance_scale}, {sampling_seconds:.1f} s to sample\n")
    print(f"{'images':<12}{'colour':>9}{'shape':>9}{'background':>12}{'all three':>11}{'n':>7}")
    rows = {"generated": generated} | ({"real (val)": real} if real else {})
    for name, hits in rows.items():
        print(f"{name:<12}" + "".join(f"{hit_rate(hits[f]):>{w}.1%}" for f, w in zip((*FACTS, "all"), (9, 9, 12, 11)))
              + f"{len(hits['all']):>7}")
    per_value = {}
    for fact, values in (("colour", COLOURS), ("shape", SHAPES), ("background", BACKGROUNDS)):
        for value in values:
            mask = [parse_caption(p)[fact] == value for p in prompts]
            per_value[f"{fact}={value}"] = hit_rate([h for h, m in zip(generated[fact], mask) if m])
    print("\nper prompt value (generated): " + ", ".join(f"{k} {v:.0%}" for k, v in per_value.items()))

    output = Path(args.output) if args.output else run_folder(ckpt) / "prompt_adherence.json"
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
        "generated": {fact: hit_rate(generated[fact]) for fact in (*FACTS, "all")},
        "real_validation_images": {fact: hit_rate(real[fact]) for fact in (*FACTS, "all")} if real else None,
        "generated_per_value": per_value,
        "num_images": len(prompts),
        "sampling_seconds": sampling_seconds,
        "grid": str(grid_path),
        "machine": machine_info(),
    }
    output.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {output} and {grid_path}")


if __name__ == "__main__":
    main()
