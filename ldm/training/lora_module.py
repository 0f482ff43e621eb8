"""What ``LatentDiffusion`` does differently under ``model.lora``: adapters in, checkpoints checked, plain model out."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ldm.interchange.lora_files import LoraNames, LoraWeights, read_lora_file, write_lora_file
from ldm.training.lora import (
    TEXT_TARGETS,
    LoraError,
    LoraOptions,
    add_adapters,
    adapter_weights,
    set_adapter_weights,
    without_adapters,
)


def add_lora_to_module(module: Any) -> None:
    """Wrap the module's U-Net (and text tower) with the adapters ``module.lora`` describes; load
    ``init_weights`` when given (a LoRA file of another run or tool, to continue training it)."""
    options: LoraOptions = module.lora
    names = LoraNames(module.unet, module.text_encoder) if options.init_weights else None
    add_adapters(module.unet, options.unet_targets(), options, "model.lora.target_modules")
    if options.text_encoder:
        add_adapters(module.text_encoder.tower, TEXT_TARGETS, options, "model.lora.text_encoder")
    if options.init_weights:
        adapters = read_lora_file(options.init_weights, names)
        set_adapter_weights(adapted_components(module), adapters, f"model.lora.init_weights={options.init_weights}")


def adapted_components(module: Any) -> dict[str, nn.Module]:
    """``{"unet": ..., "text_encoder": tower}``: the modules adapter names start with."""
    return {"unet": module.unet, "text_encoder": module.text_encoder.tower}


def module_adapters(module: Any, use_ema: bool = True) -> dict[str, LoraWeights]:
    """The module's adapters (the U-Net's from its EMA copy with ``use_ema`` and one exists)."""
    components = adapted_components(module)
    if use_ema and module.ema_unet is not None:
        components["unet"] = module.ema_unet.module
    return adapter_weights(components)


def lora_pipeline_parts(module: Any, use_ema: bool) -> tuple[nn.Module, nn.Module, dict[str, Tensor] | None]:
    """(U-Net, text encoder, EMA U-Net state or None) with the adapters merged in: plain models for sampling
    and export."""
    has_ema = module.ema_unet is not None
    unet = without_adapters(module.ema_unet.module if (use_ema and has_ema) else module.unet)
    ema_state = without_adapters(module.ema_unet.module).state_dict() if (not use_ema and has_ema) else None
    text_encoder = module.text_encoder
    if module.lora.text_encoder:
        text_encoder = without_adapters(text_encoder)
    return unet, text_encoder, ema_state


def check_lora_checkpoint(checkpoint: Mapping[str, Any], own_state: Mapping[str, Tensor],
                          options: LoraOptions | None) -> None:
    """A checkpoint resumes a LoRA run only with the adapters it holds: the same layers, the same rank."""
    recorded = checkpoint.get("ldm_lora")
    if recorded is None or options is None:
        raise LoraError("the checkpoint was trained with model.lora but this run has none; set model.lora as in "
                        "the run that wrote it" if recorded is not None else
                        "model.lora is set but the checkpoint holds no LoRA adapters (a full fine-tune); start a "
                        "new run (ckpt_path=null) or drop model.lora")
    state = checkpoint["state_dict"]
    saved = {key for key in state if ".lora_" in key}
    expected = {key for key in own_state if ".lora_" in key}
    mismatched = [f"{key} {tuple(state[key].shape)} vs {tuple(own_state[key].shape)}"
                  for key in sorted(saved & expected) if state[key].shape != own_state[key].shape]
    if mismatched:
        raise LoraError(f"model.lora.rank={options.rank} but the checkpoint was trained with rank "
                        f"{recorded['rank']}: {len(mismatched)} adapter(s) differ in shape, e.g. "
                        f"{', '.join(mismatched[:3])}; set model.lora.rank={recorded['rank']}")
    if saved != expected:
        extra, missing = sorted(saved - expected), sorted(expected - saved)
        raise LoraError(f"the checkpoint's adapters are on other layers than model.lora targets "
                        f"(model.lora.target_modules={list(options.target_modules)}, checkpoint "
                        f"{list(recorded['target_modules'])}): only in the checkpoint {extra[:5]}, only here "
                        f"{missing[:5]}")


LORA_FILE_NAMES = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors"}


def write_run_lora(module: Any, folder: str | Path, use_ema: bool = True) -> list[Path]:
    """Write the module's adapters into ``folder``: ``lora_kohya.safetensors`` and, for U-Net adapters alone
    (see ``ldm.interchange.lora_files``), ``pytorch_lora_weights.safetensors``, the name diffusers'
    ``load_lora_weights(folder)`` looks for."""
    adapters = module_adapters(module, use_ema)
    names = LoraNames(module.unet, module.text_encoder)
    layouts = ["kohya"] + ([] if module.lora.text_encoder else ["diffusers"])
    return [write_lora_file(Path(folder) / LORA_FILE_NAMES[layout], adapters, names, layout=layout)
            for layout in layouts]
