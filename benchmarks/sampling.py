"""Sampling speed: ldm's TextToImagePipeline against diffusers' StableDiffusionPipeline on the same exported model.

Both pipelines load the same diffusers folder (an exported run's ``model/``); diffusers' scheduler is built
from that folder's scheduler config (DPMSolverMultistepScheduler or DDIMScheduler), and ldm's sampler gets
the same timestep spacing and offset, so both run the same sampler, steps, guidance, prompts, batch and
initial latents. The two alternate call by call, each going first in every other repeat (text encoding, sampling and VAE decoding included), so the
machine's drifts hit both alike; images/s is the median over the repeats. The largest pixel difference
between the two pipelines' images is recorded as a check that they computed the same thing.

    python benchmarks/sampling.py                                  # the newest demo run's model, DPM-Solver++ 20
    python benchmarks/sampling.py --model PATH --sampler ddim --steps 50 --batch 16

Writes benchmarks/results/sampling.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEMO_GUIDANCE_SCALE, ROOT, machine_info, newest_checkpoint, DEMO_MODELS  # noqa: E402
from ldm.evaluation.prompt_adherence import all_demo_captions  # noqa: E402
from ldm.pipeline import TextToImagePipeline  # noqa: E402

# ldm sampler name -> diffusers scheduler class of the same algorithm (ldm's samplers follow these step for step).
SCHEDULERS = {"dpmpp_2m": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def diffusers_pipeline(model: Path, sampler: str, device: torch.device, dtype: torch.dtype):
    """diffusers' StableDiffusionPipeline of ``model`` with the scheduler of ``sampler`` built from the folder's config."""
    import diffusers  # only benchmarks and tests use diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                             dtype=dtype)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def ldm_sampler_options(scheduler_config: dict) -> dict:
    """ldm sampler keyword arguments that reproduce diffusers' timesteps for this scheduler config."""
    return {"timestep_spacing": scheduler_config.get("timestep_spacing", "leading"),
            "steps_offset": int(scheduler_config.get("steps_offset", 0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="an exported diffusers folder (default: the newest demo run's model/)")
    parser.add_argument("--sampler", choices=list(SCHEDULERS), default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps")
    parser.add_argument("--guidance-scale", type=float, default=DEMO_GUIDANCE_SCALE)
    parser.add_argument("--batch", type=int, default=32, help="images per call, one batch")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per pipeline (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights of both pipelines")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/sampling.json"))
    args = parser.parse_args()

    model = Path(args.model) if args.model else newest_checkpoint(DEMO_MODELS)
    if not (model / "model_index.json").is_file():
        raise SystemExit(f"--model {model}: not a diffusers folder (no model_index.json); export one with "
                         f"python -m ldm.tools.export --format diffusers")
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ours = TextToImagePipeline.from_pretrained(model, device=device)
    for part in (ours.network, ours.vae, ours.text_encoder):
        part.to(dtype)
    reference = diffusers_pipeline(model, args.sampler, device, dtype)
    options = ldm_sampler_options(dict(reference.scheduler.config))
    resolution = args.resolution or ours.resolution
    captions = all_demo_captions()
    prompts = [captions[i % len(captions)] for i in range(args.batch)]
    seeds = list(range(args.batch))
    noise = ours.initial_noise(seeds, resolution, resolution)

    def run_ldm() -> torch.Tensor:
        return ours(prompts, resolution, resolution, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                    sampler=args.sampler, seed=seeds, **options)

    def run_diffusers() -> torch.Tensor:
        return reference(prompts, height=resolution, width=resolution, num_inference_steps=args.steps,
                         guidance_scale=args.guidance_scale, latents=noise.to(dtype), output_type="pt").images

    runs = {"ldm": run_ldm, "diffusers": run_diffusers}
    times: dict[str, list[float]] = {name: [] for name in runs}
    images: dict[str, torch.Tensor] = {}
    for index in range(args.warmup + args.repeats):
        # Alternate which pipeline goes first, so neither always runs on a cache the other warmed.
        for name in (["ldm", "diffusers"] if index % 2 == 0 else ["diffusers", "ldm"]):
            run = runs[name]
            synchronize(device)
            start = time.perf_counter()
            images[name] = run()
            synchronize(device)
            if index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    images_per_s = {name: args.batch / s for name, s in seconds.items()}
    ratio = images_per_s["ldm"] / images_per_s["diffusers"]
    difference = float((images["ldm"].float().cpu() - images["diffusers"].float().cpu()).abs().max())

    print(f"\nSampling, ldm vs diffusers, {model}\n{args.sampler} {args.steps} steps, guidance {args.guidance_scale}, "
          f"batch {args.batch}, {resolution} px, {args.dtype}, {args.device}, median of {args.repeats}\n")
    print(f"{'pipeline':10} {'s/call':>8} {'img/s':>8}")
    for name in runs:
        print(f"{name:10} {seconds[name]:8.3f} {images_per_s[name]:8.2f}")
    print(f"ratio ldm/diffusers images/s: {ratio:.3f}; largest pixel difference {difference:.2e}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "model": str(model), "sampler": args.sampler, "diffusers_scheduler": type(reference.scheduler).__name__,
        "ldm_sampler_options": options, "steps": args.steps, "guidance_scale": args.guidance_scale,
        "batch": args.batch, "resolution": resolution, "dtype": args.dtype, "device": args.device,
        "repeats": args.repeats, "seconds_per_call": times, "median_seconds": seconds, "images_per_s": images_per_s,
        "ratio_ldm_over_diffusers": ratio, "max_abs_pixel_difference": difference, "machine": machine_info(),
    }, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
