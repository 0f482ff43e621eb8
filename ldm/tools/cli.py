"""What the ``python -m ldm.tools.*`` programs share: the model options and one-line errors.

The tools use argparse (``--option value``, ``--help``): each is a plain program over files, with no
config tree to compose; the Hydra entry points (train.py, eval.py) take ``key=value`` overrides.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from ldm.pipeline import TextToImagePipeline

# Errors about the user's input: printed as one line, without a traceback. ldm's own (NotACheckpointError,
# FrozenFileError, CheckpointMismatchError, ConfigError) are ValueErrors; IsADirectoryError and
# NotADirectoryError are a path of the wrong kind.
USER_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError)


class ToolParser(argparse.ArgumentParser):
    """argparse with the tools' error form: one line ``error: ...`` on stderr and exit status 2 (``--help``
    shows the usage); argparse's own prints the usage first, a second line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 0")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a finite number (no nan or inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace an existing output (refused otherwise, ``ldm.atomic.refuse_existing``)."""
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists (default: refuse)")


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
    parser.add_argument("--lora-scale", type=finite_float, default=1.0, help="the LoRA update's weight (default 1)")
    parser.add_argument("--device", default="cpu")


def load_pipeline(args: argparse.Namespace) -> TextToImagePipeline:
    """The pipeline the parsed model options name."""
    from ldm.pipeline import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(
        args.model, device=args.device, use_ema=False if args.no_ema else None, vae_weights=args.vae_weights,
        pretrained=args.pretrained, prediction_type=args.prediction_type, lora=args.lora, lora_scale=args.lora_scale)


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a tool's ``main(argv)``; an error in the user's input ends it with one line on stderr and exit status 2."""
    try:
        main(argv)
    except USER_ERRORS as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        print(f"error: {lines[0] if lines else type(error).__name__}", file=sys.stderr)
        sys.exit(2)
