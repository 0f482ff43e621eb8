"""Writing a model in the ecosystem's formats: a pipeline or a training module as a diffusers folder or an SD
single file, and LoRA adapters alone in diffusers' or kohya's layout (``python -m ldm.tools.export`` is the
command over these).

A diffusers folder is what ``StableDiffusionPipeline.from_pretrained`` (an SDXL-class model:
``StableDiffusionXLPipeline``) loads: U-Net, VAE, CLIP text encoder and tokenizer, a DDIM scheduler with the
run's noise schedule. An SD file is one original-layout ``.safetensors`` file (the text encoder in SD 2.x's
OpenCLIP layout when it reads the penultimate layer, SD 1.x's transformers layout when it reads the last; an
SDXL-class model's two towers as SDXL keeps them), with ldm's model config in its metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm.checkpoints import read_torch_file
from ldm.interchange.build import build, constructor_arguments
from ldm.interchange.diffusers_folder import check_sdxl_conditioner, write_diffusers_folder
from ldm.interchange.load_model import checkpoint_adapters, load_model, source_kind
from ldm.interchange.lora_files import LoraNames, read_lora_file, write_lora_file
from ldm.interchange.original_file import original_checkpoint_state, write_original_checkpoint
from ldm.models.conditioner import TextConditioner

if TYPE_CHECKING:
    from ldm.pipeline import TextToImagePipeline

FORMATS = ("diffusers", "sd")
UNET_TARGET = "ldm.models.unet.UNetModel"


def check_exportable(model_config: Mapping[str, Any]) -> None:
    """ValueError unless the network of ``model_config`` (the components' ``_target_`` configs) has a layout in
    diffusers folders and SD files: those hold U-Nets."""
    target = (model_config.get("network") or {}).get("_target_")
    if target != UNET_TARGET:
        raise ValueError(f"the network is a {target}: diffusers folders and SD files hold U-Nets ({UNET_TARGET}) and "
                         f"this family has no mapping to them; its training checkpoint (last.ckpt) is the model, "
                         f"which from_pretrained loads")


def export_pipeline(pipeline: TextToImagePipeline, out: str | Path, format: str = "diffusers") -> Path:
    """Write a pipeline (with its ``model_config``) as a diffusers folder or an SD single file."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; choose one of {FORMATS}")
    config = pipeline.model_config
    if not all(name in config for name in ("network", "vae", "noise_schedule")):
        raise ValueError("the pipeline has no model_config: build it with TextToImagePipeline.from_pretrained")
    check_exportable(config)
    unet_state, vae_state = pipeline.network.state_dict(), pipeline.vae.state_dict()
    text_encoder = pipeline.text_encoder
    if format == "diffusers":
        return write_diffusers_folder(
            out, unet_state, constructor_arguments(config["network"]), vae_state, constructor_arguments(config["vae"]),
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
    """Export a training module (anything with ``pipeline(use_ema)`` and ``ema_network``) as ``export_pipeline``."""
    if use_ema and getattr(module, "ema_network", None) is None:
        raise ValueError("use_ema=true but the run has no EMA weights (model.ema_decay=null); export the raw weights")
    return export_pipeline(module.pipeline(use_ema=use_ema), out, format=format)


def export_lora(model: str | Path, out: str | Path, layout: str = "diffusers", lora: str | Path | None = None,
                use_ema: bool = True, vae_weights: str | Path | None = None,
                pretrained: str | Path | None = None) -> tuple[Path, int]:
    """Write the LoRA adapters of ``lora`` (a LoRA file, converting its layout) or, without it, of ``model`` (a
    LoRA run's checkpoint; its EMA adapters unless ``use_ema`` is false) to ``out`` in ``layout``.

    ``model`` also gives the layers the adapters attach to. Returns (the file written, the number of layers)."""
    loaded = load_model(model, use_ema=None if use_ema else False, vae_weights=vae_weights, pretrained=pretrained)
    names = LoraNames(loaded.network, loaded.text_encoder)
    if lora is not None:
        adapters = read_lora_file(lora, names)
    else:
        if source_kind(model) != "checkpoint":
            raise ValueError(f"--format lora needs --lora FILE or a LoRA run's checkpoint; {model} is neither")
        adapters = checkpoint_adapters(read_torch_file(model), names, use_ema=use_ema, source=model)
    return write_lora_file(out, adapters, names, layout=layout), len(adapters)
