"""Export a trained run to the ecosystem's formats.

    python -m ldm.tools.export ckpt_path=outputs/train/<run>/<time>/checkpoints/last.ckpt format=diffusers out=exported/
    python -m ldm.tools.export ckpt_path=... format=sd out=model.safetensors [use_ema=false]

``format=diffusers`` writes a folder that ``StableDiffusionPipeline.from_pretrained`` loads (U-Net,
VAE, CLIP text encoder and tokenizer, a DDIM scheduler with the run's noise schedule).
``format=sd`` writes one original-layout ``.safetensors`` file (the text encoder in SD 2.x's OpenCLIP
layout when it reads the penultimate layer, SD 1.x's transformers layout when it reads the last).
``use_ema`` (default true): the U-Net is the EMA weights; with false it is the raw weights, and an
sd file also keeps the EMA copy as ``model_ema.*``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ldm.checkpoints import load_training_checkpoint
from ldm.config import constructor_arguments
from ldm.interchange.diffusers_folder import write_diffusers_folder
from ldm.interchange.original_file import original_checkpoint_state, write_original_checkpoint

FORMATS = ("diffusers", "sd")
DEFAULTS = {"ckpt_path": None, "format": "diffusers", "out": None, "use_ema": True}


def unet_states(module: Any, use_ema: bool) -> tuple[dict, dict | None]:
    """(the exported U-Net's state dict, the EMA copy to keep beside it or None)."""
    ema = module.ema_unet.module.state_dict() if module.ema_unet is not None else None
    if use_ema:
        if ema is None:
            raise ValueError("use_ema=true but the run has no EMA weights (model.ema_decay=null); pass use_ema=false")
        return ema, None
    return module.unet.state_dict(), ema


def export_module(module: Any, out: str | Path, format: str = "diffusers", use_ema: bool = True) -> Path:
    """Write a LatentDiffusion module (with its ``model_config``) as a diffusers folder or an SD single file."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; choose one of {FORMATS}")
    unet_state, ema_state = unet_states(module, use_ema)
    scale = float(module.latent_scale_factor)
    if format == "diffusers":
        return write_diffusers_folder(
            out, unet_state, constructor_arguments(module.model_config["unet"]), module.vae.state_dict(),
            constructor_arguments(module.model_config["vae"]), module.text_encoder, module.noise_schedule,
            module.prediction_type, scale)
    text_layout = "open_clip" if module.text_encoder.layer == "penultimate" else "hf"
    state = original_checkpoint_state(unet_state, module.vae.state_dict(), module.text_encoder.tower.state_dict(),
                                      text_layout=text_layout, ema_state=ema_state)
    metadata = {"latent_scale_factor": scale, "prediction_type": module.prediction_type,
                "ldm_model_config": module.model_config}
    return write_original_checkpoint(out, state, metadata=metadata)


def main(argv: list[str] | None = None) -> Path:
    args = OmegaConf.merge(DEFAULTS, OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv)))
    unknown = set(args) - set(DEFAULTS)
    if unknown or not args.ckpt_path or not args.out:
        raise SystemExit(f"usage: python -m ldm.tools.export ckpt_path=PATH format={'|'.join(FORMATS)} out=PATH "
                         f"[use_ema=true]" + (f"; unknown keys: {sorted(unknown)}" if unknown else ""))
    module = load_training_checkpoint(args.ckpt_path)
    path = export_module(module, args.out, format=args.format, use_ema=bool(args.use_ema))
    print(f"wrote {path} ({args.format}, {'EMA' if args.use_ema else 'raw'} U-Net weights)")
    return path


if __name__ == "__main__":
    main()
