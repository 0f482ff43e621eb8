"""Micro-conditioning's effect on framing: how often an SDXL-class demo model draws its shape wholly inside
the frame at crop (0, 0) against at a large crop offset.

For every (shape, colour, background) caption of the built-in set, samples N square images with held-out
seeds twice, with the same initial noise: at crop_coords (0, 0) (SDXL's default) and at ``--crop-offset``
(with original_size = target_size + the offset, as such a crop would come from a larger image), and reports
the share whose shape lies wholly inside the frame (``ldm.evaluation.framing``), beside the same share of
real validation images (whose shapes may touch the border: the reference level).

    python benchmarks/crop_conditioning.py --model outputs/train/demo_xl/<time>/model [--size 32 64] \
        [--crop-offset 0 32] [--original-size 32 96]

Prints a table and writes ``crop_conditioning.json`` into the model's run folder, or to ``--output``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    default_val_shards, demo_sampling_parser, machine_info, newest_demo_model, real_images, run_folder)
from ldm.evaluation.framing import shape_inside_frame  # noqa: E402
from ldm.evaluation.prompt_adherence import adherence, all_demo_captions, hit_rate  # noqa: E402
from ldm.pipeline import TextToImagePipeline  # noqa: E402


def main() -> None:
    parser = demo_sampling_parser(__doc__, images_per_prompt=4, seed=200_000, output_name=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                        help="the images' size (default: square at the model's resolution)")
    parser.add_argument("--crop-offset", type=int, nargs=2, default=None, metavar=("TOP", "LEFT"),
                        help="default: half the image size in both directions")
    parser.add_argument("--original-size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                        help="original_size with the offset (default: the image size plus the offset)")
    args = parser.parse_args()

    model = Path(args.model) if args.model else newest_demo_model()
    pipeline = TextToImagePipeline.from_pretrained(model)
    height, width = args.size or (pipeline.resolution, pipeline.resolution)
    offset = tuple(args.crop_offset) if args.crop_offset else (height // 2, width // 2)
    original = tuple(args.original_size) if args.original_size else (height + offset[0], width + offset[1])
    captions = all_demo_captions()
    prompts = [caption for caption in captions for _ in range(args.images_per_prompt)]
    seeds = [args.seed + i for i in range(len(prompts))]
    settings = dict(height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                    sampler=args.sampler, seed=seeds, batch_size=args.batch_size)
    conditions = {
        "crop (0, 0)": dict(crop_coords=(0, 0)),
        f"crop {offset}": dict(crop_coords=offset, original_size=original),
    }
    rows, started = {}, time.perf_counter()
    for name, micro in conditions.items():
        images = pipeline(prompts, **settings, **micro)
        facts = adherence(images, prompts)
        rows[name] = {"inside_frame": float(shape_inside_frame(images).float().mean()),
                      **{fact: hit_rate(facts[fact]) for fact in ("colour", "shape")}, "micro_conditioning": micro}
    sampling_seconds = time.perf_counter() - started
    val_shards = args.val_shards or (default_val_shards(height) if height == width else None)
    if val_shards:
        real, _ = real_images(val_shards, height, limit=512)
        rows["real (val)"] = {"inside_frame": float(shape_inside_frame(real).float().mean())}

    print(f"\nCrop conditioning: {model}\n{len(captions)} prompts x {args.images_per_prompt} images at {height}x{width}, "
          f"{args.sampler} {args.steps} steps, guidance {args.guidance_scale}\n")
    print(f"{'images':<22}{'inside frame':>14}{'colour':>9}{'shape':>9}")
    for name, row in rows.items():
        print(f"{name:<22}{row['inside_frame']:>14.1%}" + "".join(
            f"{row[fact]:>9.1%}" if fact in row else f"{'':>9}" for fact in ("colour", "shape")))
    output = Path(args.output) if args.output else run_folder(model) / "crop_conditioning.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "model": str(model), "rows": rows, "num_images": len(prompts), "sampling_seconds": sampling_seconds,
        "settings": {"images_per_prompt": args.images_per_prompt, "sampler": args.sampler, "steps": args.steps,
                     "guidance_scale": args.guidance_scale, "first_seed": args.seed, "size": [height, width]},
        "machine": machine_info(),
    }, indent=2))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
