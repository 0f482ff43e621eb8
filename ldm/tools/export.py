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
from pathlib import Path

from ldm.atomic import refuse_existing, remove_output
from ldm.interchange.export import FORMATS, export_lora, export_pipeline
from ldm.interchange.lora_files import LAYOUTS
from ldm.tools.cli import ToolParser, add_model_arguments, add_overwrite_argument, load_pipeline, run_cli

LORA_FORMAT = "lora"


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
        path, layers = export_lora(args.model, args.out, layout=args.lora_layout, lora=args.lora,
                                   use_ema=not args.no_ema, vae_weights=args.vae_weights, pretrained=args.pretrained)
        print(f"wrote {path} ({args.lora_layout} LoRA layout, {layers} layers)")
        return path
    if args.lora is not None and not args.merge_lora:
        raise ValueError(f"--lora {args.lora} with --format {args.format}: add --merge-lora to write the model with "
                         "the adapter merged in, or use --format lora to write the adapter alone")
    pipeline = load_pipeline(args)
    if args.overwrite and args.format == "diffusers":
        remove_output(args.out)  # a folder is written whole under a new name and cannot replace one in place
    path = export_pipeline(pipeline, args.out, format=args.format)
    print(f"wrote {path} ({args.format}, {'raw' if args.no_ema else 'EMA'} U-Net weights)")
    return path


if __name__ == "__main__":
    run_cli(main)
