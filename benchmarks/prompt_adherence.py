"""Prompt adherence of a trained demo model, measured by pixel statistics.

For every (shape, colour, background) caption of the built-in data set, samples N images with
held-out seeds, classifies each image's shape, colour and background with
``ldm.evaluation.pixel_scene_classifier.classify_scene`` (no learned model) and reports how often each fact matches
the prompt. The same classifier is run on real validation images first, so the table shows how
far the measurement itself can be trusted.

    python benchmarks/prompt_adherence.py [--model PATH] [--images-per-prompt 8] [--steps 50] [--output FILE]

Prints a table and writes ``prompt_adherence.json`` (+ a grid PNG of the first image per caption) into
the model's run folder, or to ``--output`` (the committed figures: benchmarks/results/).

At several image sizes (a model trained on the multi-aspect set, ``experiment=demo_buckets``)::

    python benchmarks/prompt_adherence.py --sizes 32x32 32x64 64x32 --unseen-sizes 32x48 48x32

measures each size separately, over every caption that size can have (wide images: the shape on the
left or right; tall: top or bottom; square: no position), ``--images-per-size`` images each, and checks the
classifier first on real scenes the data set's generator draws at that size, and on their centre square
crops (what a square pipeline would train on: the crop cuts the scene).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    default_val_shards, demo_sampling_parser, machine_info, newest_demo_model, real_images, run_folder)
from ldm.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, parse_caption  # noqa: E402
from ldm.evaluation.prompt_adherence import (  # noqa: E402
    FACTS, POSITION, adherence, all_demo_captions, hit_rate, real_scenes_at, square_centre_crops)
from ldm.pipeline import TextToImagePipeline  # noqa: E402
from ldm.visualization import captioned_grid, to_pil_images  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    """``"32x64"`` -> (32, 64): height x width."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size HEIGHTxWIDTH, e.g. 32x64") from None
    return height, width


def rates(hits: dict[str, list[bool]]) -> dict[str, float]:
    """Each fact's hit rate, position included where the captions state one."""
    return {fact: hit_rate(hits[fact]) for fact in (*FACTS, POSITION, "all") if fact in hits}


def per_size(args: argparse.Namespace, ckpt: Path, pipeline: TextToImagePipeline) -> None:
    """Adherence at each of ``--sizes`` and ``--unseen-sizes`` separately, checked on real scenes first."""
    sizes = [(size, True) for size in args.sizes] + [(size, False) for size in args.unseen_sizes]
    results, cells, cell_captions = {}, [], []
    print(f"\nPrompt adherence per size: {ckpt}\n{args.sampler} {args.steps} steps, guidance {args.guidance_scale}, "
          f"{args.images_per_size} images per size\n")
    print(f"{'size':<8}{'trained':>8}{'images':>12}{'colour':>9}{'shape':>9}{'background':>12}{'position':>10}"
          f"{'all':>8}{'n':>6}")
    for (height, width), trained in sizes:
        pipeline.check_size(height, width)
        captions = all_demo_captions(height, width)
        prompts = [captions[i % len(captions)] for i in range(args.images_per_size)]
        started = time.perf_counter()
        images = pipeline(prompts, height=height, width=width, num_inference_steps=args.steps,
                          guidance_scale=args.guidance_scale, sampler=args.sampler,
                          seed=[args.seed + i for i in range(len(prompts))], batch_size=args.batch_size)
        seconds = time.perf_counter() - started
        real_images, real_captions = real_scenes_at(height, width, args.real_per_size, seed=args.seed)
        rows = {"generated": rates(adherence(images, prompts)), "real": rates(adherence(real_images, real_captions))}
        if height != width:
            cropped = adherence(square_centre_crops(real_images), real_captions)  # a square has no position to read
            rows["square crop"] = {fact: hit_rate(cropped[fact]) for fact in FACTS}
        name = f"{height}x{width}"
        for label, row in rows.items():
            print(f"{name:<8}{'yes' if trained else 'no':>8}{label[:11]:>12}"
                  + "".join(f"{row[f]:>{w}.1%}" if f in row else f"{'-':>{w}}"
                            for f, w in zip((*FACTS, POSITION, "all"), (9, 9, 12, 10, 8)))
                  + f"{len(prompts) if label == 'generated' else len(real_captions):>6}")
        results[name] = {"trained": trained, "height": height, "width": width, "num_images": len(prompts),
                         "num_captions": len(captions), "sampling_seconds": seconds,
                         "generated": rows["generated"], "real": rows["real"],
                         "real_centre_square_crop": rows.get("square crop")}
        stride = len(captions) // args.grid_per_size + 1  # captions spread over shapes, colours and positions
        for index in [i for i in range(0, stride * args.grid_per_size, stride) if i < len(prompts)]:
            cells.append(to_pil_images(images[index : index + 1])[0])
            cell_captions.append(f"{name}{'' if trained else ' (unseen)'}: {prompts[index]}")
    output = Path(args.output) if args.output else run_folder(ckpt) / "prompt_adherence_sizes.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    grid_path = output.with_suffix(".png")
    captioned_grid(cells, cell_captions, columns=args.grid_per_size, tile_size=128, caption_lines=4).save(grid_path)
    result = {
        "checkpoint": str(ckpt),
        "settings": {"images_per_size": args.images_per_size, "real_per_size": args.real_per_size,
                     "sampler": args.sampler, "num_inference_steps": args.steps,
                     "guidance_scale": args.guidance_scale, "first_seed": args.seed},
        "per_size": results, "grid": str(grid_path), "machine": machine_info(),
    }
    output.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {output} and {grid_path}")


def main() -> None:
    parser = demo_sampling_parser(__doc__, images_per_prompt=8, seed=100_000, output_name=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=None,
                        help="HEIGHTxWIDTH sizes the model was trained at, each measured separately")
    parser.add_argument("--unseen-sizes", type=parse_size, nargs="*", default=[],
                        help="HEIGHTxWIDTH sizes it was not trained at, measured the same way")
    parser.add_argument("--images-per-size", type=int, default=432)
    parser.add_argument("--real-per-size", type=int, default=432)
    parser.add_argument("--grid-per-size", type=int, default=6)
    args = parser.parse_args()
    if args.unseen_sizes and not args.sizes:
        parser.error("--unseen-sizes needs --sizes (the sizes the model was trained at)")

    ckpt = Path(args.model) if args.model else newest_demo_model()
    pipeline = TextToImagePipeline.from_pretrained(ckpt)
    if args.sizes:
        per_size(args, ckpt, pipeline)
        return
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
