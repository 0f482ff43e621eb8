"""Which sampler is good enough at what cost: prompt adherence and a distribution distance per step count.

Runs every sampler at several step counts on the trained demo model, for the same prompts and the
same initial noise, and prints for each: U-Net evaluations per image, seconds, prompt adherence
(colour, shape, background by pixel statistics) and the Frechet distance to the real validation
images on pooled-pixel features (``ldm.evaluation.metrics.PooledPixelFeatures``; no Inception
weights exist offline). Lower distance is better; the same "real vs real" row gives the noise floor.

    python benchmarks/samplers.py [--ckpt PATH] [--images-per-prompt 4] [--runs ddim:10,20,50 dpmpp_2m:5,10,20]

Writes benchmarks/results/samplers.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    default_val_shards, demo_sampling_parser, machine_info, newest_demo_model, real_images)
from ldm.evaluation.metrics import PooledPixelFeatures, frechet_distance  # noqa: E402
from ldm.evaluation.prompt_adherence import adherence_rates, all_demo_captions  # noqa: E402
from ldm.pipeline import TextToImagePipeline  # noqa: E402

DEFAULT_RUNS = ["ddpm:100,1000", "ddim:10,20,50,100", "euler:10,20,50", "euler_ancestral:20,50",
                "dpmpp_2m:5,10,20", "dpmpp_2m_karras:10,20"]
# Run names beyond the sampler's own name select options of that sampler.
RUN_OPTIONS = {"dpmpp_2m_karras": ("dpmpp_2m", {"karras_sigmas": True}),
               "euler_karras": ("euler", {"karras_sigmas": True})}


def parse_runs(specs: list[str]) -> list[tuple[str, int]]:
    """``["ddim:10,20", ...]`` -> ``[("ddim", 10), ("ddim", 20), ...]``."""
    runs = []
    for spec in specs:
        name, _, steps = spec.partition(":")
        if not steps:
            raise SystemExit(f"run {spec!r}: write it as SAMPLER:STEPS[,STEPS...]")
        runs += [(name, int(s)) for s in steps.split(",")]
    return runs


def main() -> None:
    parser = demo_sampling_parser(__doc__, images_per_prompt=4, seed=200_000, output_name="samplers.json")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="SAMPLER:STEPS,... (samplers or "
                        f"{sorted(RUN_OPTIONS)})")
    args = parser.parse_args()

    ckpt = Path(args.model) if args.model else newest_demo_model()
    pipeline = TextToImagePipeline.from_pretrained(ckpt)
    resolution = pipeline.resolution
    prompts = [c for c in all_demo_captions() for _ in range(args.images_per_prompt)]
    seeds = [args.seed + i for i in range(len(prompts))]
    val_shards = args.val_shards or default_val_shards(resolution)
    if val_shards is None:
        raise SystemExit("no validation shards found; pass --val-shards")
    real, _ = real_images(val_shards, resolution, limit=2 * len(prompts))
    feature = PooledPixelFeatures()
    half = len(real) // 2
    floor = frechet_distance(real[:half], real[half:], feature)

    print(f"\nSamplers on {ckpt}\n{len(prompts)} images ({args.images_per_prompt} per prompt), guidance "
          f"{args.guidance_scale}; Frechet distance on pooled pixels vs {len(real)} real images "
          f"(real half vs half: {floor:.4f})\n")
    header = f"{'sampler':<18}{'steps':>6}{'U-Net evals':>13}{'seconds':>9}{'colour':>8}{'shape':>7}{'backgr.':>9}{'all':>7}{'FD':>9}"
    print(header)
    rows = []
    for name, steps in parse_runs(args.runs):
        sampler, options = RUN_OPTIONS.get(name, (name, {}))
        started = time.perf_counter()
        images = pipeline(prompts, height=resolution, width=resolution, num_inference_steps=steps,
                          guidance_scale=args.guidance_scale, sampler=sampler, seed=seeds,
                          batch_size=args.batch_size, **options)
        seconds = time.perf_counter() - started
        rates = adherence_rates(images, prompts)
        # Each step evaluates the U-Net once on the batched [unconditional; conditional] pair.
        row = {"run": name, "sampler": sampler, "options": options, "steps": steps, "unet_evals_per_image": 2 * steps,
               "seconds": seconds, **rates, "frechet_distance": frechet_distance(real, images, feature)}
        rows.append(row)
        print(f"{name:<18}{steps:>6}{row['unet_evals_per_image']:>13}{seconds:>9.1f}{rates['colour']:>8.1%}"
              f"{rates['shape']:>7.1%}{rates['background']:>9.1%}{rates['all']:>7.1%}{row['frechet_distance']:>9.4f}")

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "checkpoint": str(ckpt), "num_images": len(prompts), "guidance_scale": args.guidance_scale,
        "first_seed": args.seed, "num_real_images": len(real), "real_half_vs_half_frechet_distance": floor,
        "feature": "PooledPixelFeatures(size=4)", "runs": rows, "machine": machine_info(),
    }, indent=2))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
