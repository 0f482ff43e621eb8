"""Generate images from a trained model: an ldm checkpoint, a diffusers folder or an SD file.

    python -m ldm.tools.sample --model outputs/train/demo/<time>/model \
        --prompt "a red circle on a white background" --prompt "a blue square on a gray background" \
        --num-images 4 --sampler ddim --steps 50 --guidance-scale 2 --seed 0 --out-dir samples/

Any size whose sides are multiples of the VAE x U-Net factor works (--height/--width, or --size HEIGHTxWIDTH
repeated to generate every prompt at each size, e.g. --size 32x64 --size 64x32, mixed in one grid).
Writes one PNG per image (``NNNN_<prompt>.png``, ``NNNN_<prompt>_<H>x<W>.png`` with --size) and ``grid.png``
with captions, by default into ``outputs/samples/<date>_<time>/`` under ``LDM_ROOT`` (or the current folder).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from ldm.atomic import refuse_existing
from ldm.diffusion.sampling import SAMPLERS
from ldm.diffusion.timesteps import TIMESTEP_SPACINGS
from ldm.tools.cli import (ToolParser, add_model_arguments, add_overwrite_argument, finite_float, load_pipeline,
                           nonnegative_int, positive_int, run_cli)
from ldm.visualization import captioned_grid, to_pil_images


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "empty"


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from the command line and/or a file of one prompt per line (blank lines skipped)."""
    collected = list(prompts or [])
    if prompts_file:
        collected += [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    if not collected:
        raise ValueError("no prompt: give at least one --prompt or a --prompts-file")
    return collected


def sampler_options_from(args: argparse.Namespace) -> dict:
    """The sampler keyword arguments given on the command line, refused where the sampler has no such option."""
    options = {}
    if args.timestep_spacing is not None:
        options["timestep_spacing"] = args.timestep_spacing
    if args.eta is not None:
        if args.sampler != "ddim":
            raise ValueError(f"--eta applies to --sampler ddim, not {args.sampler}")
        options["eta"] = args.eta
    if args.karras_sigmas:
        if args.sampler in ("ddpm", "ddim"):
            raise ValueError(f"--karras-sigmas applies to euler, euler_ancestral and dpmpp_2m, not {args.sampler}")
        options["karras_sigmas"] = True
    return options


def default_out_dir() -> Path:
    """``outputs/samples/<date>_<time>`` under ``LDM_ROOT`` or the current folder (never a tracked folder)."""
    root = Path(os.environ.get("LDM_ROOT") or Path.cwd())
    return root / "outputs" / "samples" / time.strftime("%Y-%m-%d_%H-%M-%S")


def image_size(text: str) -> tuple[int, int]:
    """``"32x64"`` -> (32, 64): height x width."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH, e.g. 32x64") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be at least 1")
    return height, width


def main(argv: list[str] | None = None) -> list[Path]:
    parser = ToolParser(prog="python -m ldm.tools.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    parser.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                        help="default: the objective's (ddim for epsilon / v / x0, flow_euler, edm_heun)")
    parser.add_argument("--steps", type=positive_int, default=50)
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=None,
                        help="default: the sampler's own (leading for DDPM/DDIM, linspace for the others)")
    parser.add_argument("--eta", type=finite_float, default=None, help="DDIM only: 0 deterministic, 1 as DDPM")
    parser.add_argument("--karras-sigmas", action="store_true", help="Euler, Euler-a and DPM-Solver++ only")
    parser.add_argument("--guidance-scale", type=finite_float, default=5.0)
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="image i uses seed + i")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--height", type=positive_int, default=None, help="default: the training resolution")
    parser.add_argument("--width", type=positive_int, default=None, help="default: the training resolution")
    parser.add_argument("--size", type=image_size, action="append", default=None,
                        help="HEIGHTxWIDTH (repeat for several): every prompt at each size; not with --height/--width")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    for name, default, meaning in (("original-size", "the image size", "HEIGHT WIDTH"),
                                   ("crop-coords", "0 0", "TOP LEFT"), ("target-size", "the image size", "HEIGHT WIDTH")):
        parser.add_argument(f"--{name}", type=nonnegative_int, nargs=2, default=None, metavar=tuple(meaning.split()),
                            help=f"SDXL-class models' micro-conditioning (default: {default})")
    parser.add_argument("--out-dir", default=None, help="default: outputs/samples/<date>_<time>")
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    if args.out_dir and Path(args.out_dir).is_dir() and any(Path(args.out_dir).iterdir()):
        refuse_existing(args.out_dir, "--overwrite", args.overwrite)

    if args.size and (args.height or args.width):
        raise ValueError("give --size, or --height/--width, not both")
    sampler_options = sampler_options_from(args)
    prompts = [p for p in read_prompts(args.prompt, args.prompts_file) for _ in range(args.num_images)]
    pipeline = load_pipeline(args)
    sizes = args.size or [(args.height or pipeline.resolution, args.width or pipeline.resolution)]
    for height, width in sizes:
        pipeline.check_size(height, width)  # before any sampling
    sized = [(prompt, size) for size in sizes for prompt in prompts]
    images = pipeline.generate_at_sizes(
        [prompt for prompt, _ in sized], [size for _, size in sized], seed=[args.seed + i % len(prompts)
                                                                            for i in range(len(sized))],
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler,
        negative_prompt=args.negative_prompt, batch_size=args.batch_size,
        original_size=args.original_size, crop_coords=args.crop_coords or (0, 0), target_size=args.target_size,
        **sampler_options,
    )
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    pil_images = to_pil_images(images)
    paths = []
    for index, (image, (prompt, (height, width))) in enumerate(zip(pil_images, sized)):
        path = out_dir / f"{index:04d}_{slug(prompt)}{f'_{height}x{width}' if args.size else ''}.png"
        image.save(path)
        paths.append(path)
    captions = [f"{h}x{w}: {prompt}" if args.size else prompt for prompt, (h, w) in sized]
    captioned_grid(pil_images, captions, columns=min(8, len(prompts) if args.size else len(sized))).save(
        out_dir / "grid.png")
    print(f"wrote {len(paths)} images and grid.png to {out_dir}")
    return paths


if __name__ == "__main__":
    run_cli(main)
