"""Reconstruct the EMA of any relative standard deviation from a run's post-hoc EMA snapshots.

    python -m ldm.tools.posthoc_ema --model outputs/train/RUN/model --snapshots outputs/train/RUN/posthoc_ema \\
        --sigma-rel 0.08 --out outputs/train/RUN/model_ema_0.08

The run must have trained with the post-hoc EMA callback (``callbacks=diffusion_posthoc_ema``), which
writes the snapshots of two power-function EMA profiles. ``--model`` gives everything but the U-Net's
weights (the run's model folder or a checkpoint); the U-Net becomes the least-squares combination of the
snapshots (Karras et al. 2024, Algorithm 3) for ``--sigma-rel`` at ``--step`` (default: the last
snapshot). The result is written as a diffusers folder (or ``--format sd``) that sample, eval and export
take like any model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.atomic import refuse_existing, remove_output
from ldm.interchange.export import FORMATS, export_pipeline
from ldm.interchange.posthoc_ema import apply_posthoc_ema
from ldm.tools.cli import (ToolParser, add_model_arguments, add_overwrite_argument, finite_float, load_pipeline,
                           nonnegative_int, run_cli)

SIGMA_REL_MAX = 0.28  # the documented range: a power-function EMA profile reaches at most 1/sqrt(12) ~ 0.289 (gamma -> 0)


def main(argv: list[str] | None = None) -> Path:
    parser = ToolParser(prog="python -m ldm.tools.posthoc_ema", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--snapshots", required=True, help="the run's post-hoc EMA folder (holds posthoc_ema.json)")
    parser.add_argument("--sigma-rel", type=finite_float, required=True, help="relative standard deviation, in (0, 0.28)")
    parser.add_argument("--step", type=nonnegative_int, default=None,
                        help="the training step to reconstruct at (default: last)")
    parser.add_argument("--format", choices=FORMATS, default="diffusers")
    parser.add_argument("--out", required=True, help="the folder (diffusers) or .safetensors file (sd) to write")
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    if not 0 < args.sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"--sigma-rel {args.sigma_rel:g} must lie in (0, {SIGMA_REL_MAX:g})")
    refuse_existing(args.out, "--overwrite", args.overwrite)
    pipeline = load_pipeline(args)
    apply_posthoc_ema(pipeline, args.snapshots, args.sigma_rel, args.step)
    if args.overwrite:
        remove_output(args.out)
    path = export_pipeline(pipeline, args.out, format=args.format)
    print(f"wrote {path}: U-Net = post-hoc EMA sigma_rel={args.sigma_rel:g} from {args.snapshots}")
    return path


if __name__ == "__main__":
    run_cli(main)
