"""What the ``python -m ldm.tools.*`` programs share: the model options and one-line errors.

The tools use argparse (``--option value``, ``--help``): each is a plain program over files, with no
config tree to compose; the Hydra entry points (train.py, eval.py) take ``key=value`` overrides.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ldm.checkpoints import CheckpointMismatchError, NotACheckpointError
from ldm.interchange.frozen_files import FrozenFileError
from ldm.pipeline import TextToImagePipeline

# Errors about the user's input: printed as one line, without a traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotACheckpointError, FrozenFileError, CheckpointMismatchError,
               ValueError)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` (alias ``--ckpt``) and the options that supply what a checkpoint left out."""
    parser.add_argument("--model", "--ckpt", dest="model", required=True,
                        help="an ldm training checkpoint (last.ckpt), a diffusers folder or an SD .safetensors/.ckpt")
    parser.add_argument("--no-ema", action="store_true", help="use the raw rather than the EMA U-Net weights")
    parser.add_argument("--vae-weights", default=None,
                        help="the VAE weights file a checkpoint was trained with, when it is no longer where the "
                             "checkpoint recorded it (also searched for under LDM_ROOT and beside the checkpoint)")
    parser.add_argument("--pretrained", default=None,
                        help="likewise for the released model a fine-tune started from (model.mode.pretrained.path)")
    parser.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction", "sample"),
                        help="for a released SD file that does not record it (SD 2.x 768 px: v_prediction)")
    parser.add_argument("--lora", default=None,
                        help="a LoRA .safetensors file (diffusers or kohya layout) to merge into the model")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="the LoRA update's weight (default 1)")
    parser.add_argument("--device", default="cpu")


def load_pipeline(args: argparse.Namespace) -> TextToImagePipeline:
    """The pipeline the parsed model options name."""
    return TextToImagePipeline.from_pretrained(
        args.model, device=args.device, use_ema=False if args.no_ema else None, vae_weights=args.vae_weights,
        pretrained=args.pretrained, prediction_type=args.prediction_type, lora=args.lora, lora_scale=args.lora_scale)


def run_cli(main: Callable[[], Any]) -> None:
    """Run a tool's ``main``; an error in the user's input ends it with one line on stderr and exit status 2."""
    try:
        main()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
