"""LoRA adapters on the U-Net (and optionally the text tower) through peft: ``model/mode=lora``.

peft wraps each targeted layer; the wrapped layer keeps its frozen weight as ``base_layer`` and gains
``lora_A`` (down) and ``lora_B`` (up). Only those adapter matrices train, and only they enter the
optimizer, the EMA average and checkpoints. Adapters leave the module as ldm's ``LoraWeights`` (names of
the original layout), which ``ldm.interchange.lora_files`` writes in diffusers' or kohya's layout.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ldm.config_check import check_number
from ldm.interchange.lora_files import LoraWeights, merge_lora

ADAPTER = "default"
# Attention q/k/v/out and the feed-forward of every transformer block (ldm's original-layout names).
UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
# The convolutions of the ResBlocks and the transformers' 1x1 projections (SD 1.x), "LoCon".
UNET_CONV_TARGETS = ("in_layers.2", "out_layers.3", "skip_connection", "proj_in", "proj_out")
# OpenCLIP packs q, k, v into nn.MultiheadAttention, whose forward reads its weights directly: an adapter
# on ``attn.out_proj`` would never run. The MLP's two layers are plain linear layers.
TEXT_TARGETS = ("mlp.c_fc", "mlp.c_proj")


class LoraError(ValueError):
    """A LoRA setting or file that does not fit the model."""


@dataclass(frozen=True)
class LoraOptions:
    """``model/mode=lora``: adapters of ``rank`` with ``alpha`` (update scale alpha / rank) and ``dropout`` on the
    adapters' input. ``target_modules``: layer-name suffixes in the U-Net (attention and feed-forward by
    default); ``conv`` adds the ResBlock convolutions; ``text_encoder`` adapts the text tower's MLPs too.
    ``init_weights``: a LoRA file (any layout ``ldm.interchange.lora_files`` reads) to start from."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: Sequence[str] = field(default=UNET_ATTENTION_TARGETS)
    conv: bool = False
    text_encoder: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"model.mode.rank={self.rank!r} must be a positive integer, e.g. 4")
        check_number("model.mode.alpha", self.alpha, minimum=0.0, strict_minimum=True)
        check_number("model.mode.dropout", self.dropout, minimum=0.0, maximum=1.0)
        if not self.target_modules:
            raise LoraError("model.mode.target_modules is empty; give layer-name suffixes such as [to_q, to_v]")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def unet_targets(self) -> tuple[str, ...]:
        return self.target_modules + (UNET_CONV_TARGETS if self.conv else ())


def _suffix_pattern(targets: Sequence[str]) -> str:
    """A regex that peft matches against full module names: any name ending in one of ``targets``."""
    return r"^(.*\.)?(" + "|".join(re.escape(target) for target in targets) + r")$"


def _anchored(names: Sequence[str]) -> str:
    """A regex matching exactly ``names``: a suffix may also name a layer peft cannot wrap (an Identity skip)."""
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def _adaptable(module: nn.Module, targets: Sequence[str]) -> list[str]:
    pattern = re.compile(_suffix_pattern(targets))
    return [name for name, child in module.named_modules()
            if pattern.match(name) and isinstance(child, (nn.Linear, nn.Conv2d))]


def add_adapters(module: nn.Module, targets: Sequence[str], options: LoraOptions, option: str) -> list[str]:
    """Wrap the layers of ``module`` whose names end in ``targets`` with LoRA adapters (in place); freeze
    everything else. Returns the adapted layer names; raises ``LoraError`` naming the targets that match
    no linear or convolution layer."""
    matched = _adaptable(module, targets)
    unmatched = [target for target in targets if not any(re.search(rf"(^|\.){re.escape(target)}$", name)
                                                         for name in matched)]
    if unmatched:
        raise LoraError(f"{option}: {', '.join(unmatched)} match no linear or convolution layer of the "
                        f"{type(module).__name__}; its layers end in e.g. {_example_names(module)}")
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=_anchored(matched), init_lora_weights=True)
    module.requires_grad_(False)
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    return matched


def _example_names(module: nn.Module) -> str:
    tails = sorted({".".join(name.split(".")[-2:]) for name, child in module.named_modules()
                    if isinstance(child, (nn.Linear, nn.Conv2d)) and not name.split(".")[-1].isdigit()})
    return ", ".join(tails[:12])


def lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    """The peft-wrapped layers of ``module`` by name."""
    return {name: child for name, child in module.named_modules() if isinstance(child, LoraLayer)}


def adapter_weights(modules: Mapping[str, nn.Module]) -> dict[str, LoraWeights]:
    """The adapters of ``{"unet": unet, "text_encoder": tower}`` as ldm's ``LoraWeights`` (detached copies)."""
    adapters = {}
    for component, module in modules.items():
        for name, layer in lora_layers(module).items():
            rank = layer.r[ADAPTER]
            adapters[f"{component}.{name}"] = LoraWeights(
                down=layer.lora_A[ADAPTER].weight.detach().clone(), up=layer.lora_B[ADAPTER].weight.detach().clone(),
                alpha=float(layer.scaling[ADAPTER] * rank))
    return adapters


def set_adapter_weights(modules: Mapping[str, nn.Module], adapters: Mapping[str, LoraWeights], source: str) -> None:
    """Copy ``adapters`` (from a file) into the peft layers; the file's alpha is folded into ``up`` so its update
    is kept exactly whatever ``model.mode.alpha`` is. Every file layer must be adapted here with its rank."""
    layers = {f"{component}.{name}": layer for component, module in modules.items()
              for name, layer in lora_layers(module).items()}
    missing = sorted(set(adapters) - set(layers))
    if missing:
        raise LoraError(f"{source} adapts {len(missing)} layer(s) that model.mode.target_modules does not target: "
                        f"{', '.join(missing[:20])}; widen model.mode.target_modules (or set conv/text_encoder)")
    for name, weights in adapters.items():
        layer = layers[name]
        if layer.r[ADAPTER] != weights.rank:
            raise LoraError(f"{source} has rank {weights.rank} at {name} but model.mode.rank={layer.r[ADAPTER]}; "
                            f"set model.mode.rank={weights.rank}")
        up_scale = (weights.alpha / weights.rank) / layer.scaling[ADAPTER]
        layer.lora_A[ADAPTER].weight.data.copy_(weights.down)
        layer.lora_B[ADAPTER].weight.data.copy_(weights.up * up_scale)


def without_adapters(module: nn.Module) -> nn.Module:
    """A copy of a peft-wrapped module as the plain model, its adapters merged into the weights: the
    original class and state-dict keys, which export, sampling and other tools expect."""
    plain = copy.deepcopy(module)
    adapters = {name: weights for name, weights in adapter_weights({"m": plain}).items()}
    for name, layer in lora_layers(plain).items():
        parent_name, _, child = name.rpartition(".")
        parent = plain.get_submodule(parent_name) if parent_name else plain
        setattr(parent, child, layer.get_base_layer())
    merge_lora({"m": plain}, adapters)
    return plain


def share_frozen_weights(copy_module: nn.Module, module: nn.Module) -> None:
    """Make ``copy_module`` (an EMA copy of ``module``) use ``module``'s frozen tensors instead of its own,
    so an EMA of a LoRA model holds one copy of the base weights and averages only the adapters."""
    own = dict(module.named_parameters())
    for name, parameter in list(copy_module.named_parameters()):
        if ".lora_" in name:
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = copy_module.get_submodule(parent_name) if parent_name else copy_module
        parent._parameters[leaf] = own[name]


def trainable_fraction(modules: Sequence[nn.Module]) -> dict[str, Any]:
    """Counts of trainable (adapter) and all parameters over ``modules``, and their ratio."""
    trainable = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
    total = sum(p.numel() for m in modules for p in m.parameters())
    return {"trainable_parameters": trainable, "total_parameters": total, "trainable_fraction": trainable / total}
