"""``model/mode=lora``: peft LoRA adapters trained on released weights; adapters in, checkpoints checked, plain
model out."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from collections.abc import Sequence

from torch import Tensor, nn

from ldm.config_check import build_options
from ldm.interchange.lora_files import LoraNames, LoraWeights, read_lora_file, write_lora_file
from ldm.interchange.pretrained import PretrainedWeights
from ldm.training.lora import (
    TEXT_TARGETS,
    UNET_ATTENTION_TARGETS,
    LoraError,
    LoraOptions,
    add_adapters,
    adapter_weights,
    set_adapter_weights,
    share_frozen_weights,
    without_adapters,
)


class LoraTraining:
    """Train LoRA adapters (peft) on the network of released weights ``pretrained`` (``PretrainedWeights`` or its
    fields: an SD file or a diffusers folder, e.g. a run's model/ folder); only adapter weights are trainable,
    averaged and checkpointed (the base weights are the file's, recorded by path and sha256).
    ``rank``, ``alpha``, ``dropout``, ``target_modules``, ``conv``, ``text_encoder``, ``init_weights``: see
    ``ldm.training.lora.LoraOptions``."""

    def __init__(self, pretrained: PretrainedWeights | Mapping[str, Any] | None = None, rank: int = 4,
                 alpha: float = 4.0, dropout: float = 0.0, target_modules: Sequence[str] = UNET_ATTENTION_TARGETS,
                 conv: bool = False, text_encoder: bool = False, init_weights: str | None = None) -> None:
        self.pretrained = build_options(PretrainedWeights, pretrained, "model.mode.pretrained")
        if not self.pretrained:
            raise LoraError("model/mode=lora trains adapters on released weights: set model.mode.pretrained.path (an "
                            "SD file or a diffusers folder, e.g. a run's model/ folder)")
        self.lora = LoraOptions(rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules, conv=conv,
                                text_encoder=text_encoder, init_weights=init_weights)

    @property
    def trains_text_encoder(self) -> bool:
        return self.lora.text_encoder

    def check_text_encoder(self, text_encoder: nn.Module) -> None:
        if hasattr(text_encoder, "text_encoders"):
            raise LoraError("model/mode=lora with a text encoder of several towers (SDXL-class, model.text_encoder="
                            "TextConditioner) is not supported: LoRA files here name one text tower")

    def prepare(self, module: Any) -> None:
        """Wrap the network (and text tower) with the adapters."""
        add_lora_to_module(module)

    def prepare_ema(self, module: Any) -> None:
        """The EMA copy shares the frozen base weights with the network: only adapters are averaged."""
        if module.ema_network is not None:
            share_frozen_weights(module.ema_network.module, module.network)

    def trainable_parameters(self, module: Any) -> list[nn.Parameter]:
        trainable = [*module.network.parameters(), *module.text_encoder.parameters()]
        return [p for p in trainable if p.requires_grad]

    def prefixes_left_out(self) -> tuple[str, ...]:
        """The base network is the pretrained file's: checkpoints keep its adapters only."""
        return ("network.", "ema_network.module.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ldm_lora"] = dataclasses.asdict(self.lora)

    def on_load_checkpoint(self, checkpoint: dict[str, Any], own_state: Mapping[str, Tensor]) -> None:
        check_lora_checkpoint(checkpoint, own_state, self.lora)

    def pipeline_parts(self, module: Any, use_ema: bool) -> tuple[nn.Module, nn.Module, dict[str, Tensor] | None]:
        """The plain model with the adapters merged in: what export and other tools expect."""
        return lora_pipeline_parts(module, use_ema)


def add_lora_to_module(module: Any) -> None:
    """Wrap the module's network (and text tower) with the adapters ``module.mode.lora`` describes; load
    ``init_weights`` when given (a LoRA file of another run or tool, to continue training it)."""
    options: LoraOptions = module.mode.lora
    names = LoraNames(module.network, module.text_encoder) if options.init_weights else None
    add_adapters(module.network, options.unet_targets(), options, "model.mode.target_modules")
    if options.text_encoder:
        add_adapters(module.text_encoder.tower, TEXT_TARGETS, options, "model.mode.text_encoder")
    if options.init_weights:
        adapters = read_lora_file(options.init_weights, names)
        set_adapter_weights(adapted_components(module), adapters, f"model.mode.init_weights={options.init_weights}")


def adapted_components(module: Any) -> dict[str, nn.Module]:
    """``{"unet": ..., "text_encoder": tower}``: the modules adapter names start with."""
    return {"unet": module.network, "text_encoder": module.text_encoder.tower}


def module_adapters(module: Any, use_ema: bool = True) -> dict[str, LoraWeights]:
    """The module's adapters (the network's from its EMA copy with ``use_ema`` and one exists)."""
    components = adapted_components(module)
    if use_ema and module.ema_network is not None:
        components["unet"] = module.ema_network.module
    return adapter_weights(components)


def lora_pipeline_parts(module: Any, use_ema: bool) -> tuple[nn.Module, nn.Module, dict[str, Tensor] | None]:
    """(network, text encoder, EMA network state or None) with the adapters merged in: plain models for sampling
    and export."""
    has_ema = module.ema_network is not None
    network = without_adapters(module.ema_network.module if (use_ema and has_ema) else module.network)
    ema_state = without_adapters(module.ema_network.module).state_dict() if (not use_ema and has_ema) else None
    text_encoder = module.text_encoder
    if module.mode.lora.text_encoder:
        text_encoder = without_adapters(text_encoder)
    return network, text_encoder, ema_state


def check_lora_checkpoint(checkpoint: Mapping[str, Any], own_state: Mapping[str, Tensor],
                          options: LoraOptions | None) -> None:
    """A checkpoint resumes a LoRA run only with the adapters it holds: the same layers, the same rank."""
    recorded = checkpoint.get("ldm_lora")
    if recorded is None or options is None:
        raise LoraError("the checkpoint was trained with model/mode=lora but this run has none; set model/mode=lora "
                        "as in the run that wrote it" if recorded is not None else
                        "model/mode=lora is set but the checkpoint holds no LoRA adapters (a full fine-tune); start a "
                        "new run (ckpt_path=null) or use model/mode=full")
    state = checkpoint["state_dict"]
    saved = {key for key in state if ".lora_" in key}
    expected = {key for key in own_state if ".lora_" in key}
    mismatched = [f"{key} {tuple(state[key].shape)} vs {tuple(own_state[key].shape)}"
                  for key in sorted(saved & expected) if state[key].shape != own_state[key].shape]
    if mismatched:
        raise LoraError(f"model.mode.rank={options.rank} but the checkpoint was trained with rank "
                        f"{recorded['rank']}: {len(mismatched)} adapter(s) differ in shape, e.g. "
                        f"{', '.join(mismatched[:3])}; set model.mode.rank={recorded['rank']}")
    if saved != expected:
        extra, missing = sorted(saved - expected), sorted(expected - saved)
        raise LoraError(f"the checkpoint's adapters are on other layers than model.mode targets "
                        f"(model.mode.target_modules={list(options.target_modules)}, checkpoint "
                        f"{list(recorded['target_modules'])}): only in the checkpoint {extra[:5]}, only here "
                        f"{missing[:5]}")


LORA_FILE_NAMES = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors"}


def write_run_lora(module: Any, folder: str | Path, use_ema: bool = True) -> list[Path]:
    """Write the module's adapters into ``folder``: ``lora_kohya.safetensors`` and, for U-Net adapters alone
    (see ``ldm.interchange.lora_files``), ``pytorch_lora_weights.safetensors``, the name diffusers'
    ``load_lora_weights(folder)`` looks for."""
    adapters = module_adapters(module, use_ema)
    names = LoraNames(module.network, module.text_encoder)
    layouts = ["kohya"] + ([] if module.mode.lora.text_encoder else ["diffusers"])
    return [write_lora_file(Path(folder) / LORA_FILE_NAMES[layout], adapters, names, layout=layout)
            for layout in layouts]
