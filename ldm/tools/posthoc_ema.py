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

from ldm.interchange.export import FORMATS, export_pipeline
from ldm.interchange.posthoc_ema import apply_posthoc_ema
from ldm.tools.cli import add_model_arguments, load_pipeline, run_cli


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m ldm.tools.posthoc_ema", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--snapshots", required=True, help="the run's post-hoc EMA folder (holds posthoc_ema.json)")
    parser.add_argument("--sigma-rel", type=float, required=True, help="relative standard deviation, in (0, 0.28)")
    parser.add_argument("--step", type=int, default=None, help="the training step to reconstruct at (default: last)")
    parser.add_argument("--format", choices=FORMATS, default="diffusers")
    parser.add_argument("--out", required=True, help="the folder (diffusers) or .safetensors file (sd) to write")
    args = parser.parse_args(argv)
    pipeline = load_pipeline(args)
    apply_posthoc_ema(pipeline, args.snapshots, args.sigma_rel, args.step)
    path = export_pipeline(pipeline, args.out, format=args.format)
    print(f"wrote {path}: U-Net = post-hoc EMA sigma_rel={args.sigma_rel:g} from {args.snapshots}")
    return path


if __name__ == "__main__":
    run_cli(main)
