"""Export a trained model to the ecosystem's formats.

    python -m ldm.tools.export --model outputs/train/demo/<time>/checkpoints/last.ckpt --format diffusers --out exported/
    python -m ldm.tools.export --model ... --format sd --out model.safetensors [--no-ema]

``--model`` is an ldm training checkpoint, a diffusers folder or an SD single file (so this also
converts between the two layouts). ``--format diffusers`` writes a folder that
``StableDiffusionPipeline.from_pretrained`` loads (U-Net, VAE, CLIP text encoder and tokenizer, a DDIM
scheduler with the run's noise schedule). ``--format sd`` writes one original-layout ``.safetensors``
file (the text encoder in SD 2.x's OpenCLIP layout when it reads the penultimate layer, SD 1.x's
transformers layout when it reads the last; an SDXL-class model's two towers as SDXL keeps them), with
ldm's model config in its metadata. An SDXL-class model's folder is a ``StableDiffusionXLPipeline``'s.
By default the U-Net is the EMA weights; with ``--no-ema`` it is the raw weights, and an SD file also
keeps the EMA copy as ``model_ema.*``.

LoRA: ``--lora FILE --merge-lora`` writes the model plus the adapter as one model (so does a LoRA run's
checkpoint, whose adapters are merged); ``--format lora --lora-layout diffusers|kohya`` writes only the
adapters, of a LoRA run's checkpoint or of ``--lora FILE`` (converting its layout):

    python -m ldm.tools.export --model outputs/train/demo_lora/<time>/checkpoints/last.ckpt --format lora --lora-layout kohya --out cross_kohya.safetensors
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from ldm.checkpoints import read_torch_file
from ldm.interchange.build import build, constructor_arguments
from ldm.interchange.load_model import checkpoint_adapters, load_model, source_kind
from ldm.interchange.lora_files import LAYOUTS, LoraNames, read_lora_file, write_lora_file
from ldm.interchange.diffusers_folder import check_sdxl_conditioner, write_diffusers_folder
from ldm.interchange.original_file import original_checkpoint_state, write_original_checkpoint
from ldm.models.conditioner import TextConditioner
from ldm.pipeline import TextToImagePipeline
from ldm.atomic import refuse_existing
from ldm.tools.cli import ToolParser, add_model_arguments, add_overwrite_argument, load_pipeline, run_cli

FORMATS = ("diffusers", "sd")
LORA_FORMAT = "lora"


def export_pipeline(pipeline: TextToImagePipeline, out: str | Path, format: str = "diffusers") -> Path:
    """Write a pipeline (with its ``model_config``) as a diffusers folder or an SD single file."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; choose one of {FORMATS}")
    config = pipeline.model_config
    if not all(name in config for name in ("unet", "vae", "noise_schedule")):
        raise ValueError("the pipeline has no model_config: build it with TextToImagePipeline.from_pretrained")
    unet_state, vae_state = pipeline.unet.state_dict(), pipeline.vae.state_dict()
    text_encoder = pipeline.text_encoder
    if format == "diffusers":
        return write_diffusers_folder(
            out, unet_state, constructor_arguments(config["unet"]), vae_state, constructor_arguments(config["vae"]),
            text_encoder, build(config["noise_schedule"]), pipeline.prediction_type, pipeline.latent_scale_factor,
            pipeline.sampler_options)
    if isinstance(text_encoder, TextConditioner):  # SDXL's conditioner.embedders.{0,1}
        check_sdxl_conditioner(text_encoder)
        text_state: Any = [tower.tower.state_dict() for tower in text_encoder.text_encoders]
        text_layout = "sdxl"
    else:
        text_state, text_layout = text_encoder.tower.state_dict(), "open_clip" if text_encoder.layer == "penultimate" else "hf"
    state = original_checkpoint_state(unet_state, vae_state, text_state, text_layout=text_layout,
                                      ema_state=pipeline.ema_state)
    metadata = {"latent_scale_factor": pipeline.latent_scale_factor, "prediction_type": pipeline.prediction_type,
                "ldm_model_config": config}
    if pipeline.sampler_options:  # a flow / EDM model's sampler settings (shift, sigmas), read back by load_model
        metadata["ldm_sampler_options"] = pipeline.sampler_options
    return write_original_checkpoint(out, state, metadata=metadata)


def export_module(module: Any, out: str | Path, format: str = "diffusers", use_ema: bool = True) -> Path:
    """Export a training module (anything with ``pipeline(use_ema)`` and ``ema_unet``) as ``export_pipeline``."""
    if use_ema and getattr(module, "ema_unet", None) is None:
        raise ValueError("use_ema=true but the run has no EMA weights (model.ema_decay=null); export the raw weights")
    return export_pipeline(module.pipeline(use_ema=use_ema), out, format=format)


def main(argv: list[str] | None = None) -> Path:
    parser = ToolParser(prog="python -m ldm.tools.export", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--format", choices=(*FORMATS, LORA_FORMAT), default="diffusers")
    parser.add_argument("--out", required=True, help="the folder (diffusers) or .safetensors file (sd, lora) to write")
    parser.add_argument("--merge-lora", action="store_true", help="write the model with --lora merged in")
    parser.add_argument("--lora-layout", choices=LAYOUTS, default="diffusers", help="the layout of --format lora")
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    refuse_existing(args.out, "--overwrite", args.overwrite)  # before the model is read, not after
    if args.format == LORA_FORMAT:
        return export_lora(args)
    if args.lora is not None and not args.merge_lora:
        raise ValueError(f"--lora {args.lora} with --format {args.format}: add --merge-lora to write the model with "
                         "the adapter merged in, or use --format lora to write the adapter alone")
    pipeline = load_pipeline(args)
    if args.overwrite and args.format == "diffusers":
        remove_output(args.out)  # a folder is written whole under a new name and cannot replace one in place
    path = export_pipeline(pipeline, args.out, format=args.format)
    print(f"wrote {path} ({args.format}, {'raw' if args.no_ema else 'EMA'} U-Net weights)")
    return path


def remove_output(path: str | Path) -> None:
    """Remove an output that ``--overwrite`` replaces (a folder with what it holds)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def export_lora(args: argparse.Namespace) -> Path:
    """``--format lora``: the adapters of ``--lora`` or of a LoRA run's checkpoint, in ``--lora-layout``."""
    model = load_model(args.model, use_ema=False if args.no_ema else None, vae_weights=args.vae_weights,
                       pretrained=args.pretrained)
    names = LoraNames(model.unet, model.text_encoder)
    if args.lora is not None:
        adapters = read_lora_file(args.lora, names)
    else:
        if source_kind(args.model) != "checkpoint":
            raise ValueError(f"--format lora needs --lora FILE or a LoRA run's checkpoint; {args.model} is neither")
        adapters = checkpoint_adapters(read_torch_file(args.model), names, use_ema=not args.no_ema, source=args.model)
    path = write_lora_file(args.out, adapters, names, layout=args.lora_layout)
    print(f"wrote {path} ({args.lora_layout} LoRA layout, {len(adapters)} layers)")
    return path


if __name__ == "__main__":
    run_cli(main)
