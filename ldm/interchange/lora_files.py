"""LoRA weights between ldm and the files other tools write and read.

ldm's own form of a set of adapters is ``{"unet.<module>" | "text_encoder.<module>": LoraWeights}``, the
module named as in ldm's models (the original SD layout for the U-Net, OpenCLIP's for the text tower).
Files come in two layouts:

- ``diffusers`` (peft's names, what ``StableDiffusionPipeline.load_lora_weights`` reads):
  ``unet.<diffusers module>.lora_A.weight`` / ``lora_B.weight``, ``text_encoder.text_model.<...>``.
  The layout has no alpha (diffusers takes alpha = rank), so ``alpha / rank`` is folded into ``lora_B``.
  Text-tower adapters (on the MLPs: OpenCLIP's packed q/k/v cannot carry one) are refused here, as
  diffusers' text-encoder loader converts only attention projections; the kohya layout carries them.
- ``kohya`` (sd-scripts, read by A1111 and ComfyUI): ``lora_unet_<module with _>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``; ``lora_te_<transformers module with _>``.

Reading accepts either layout with diffusers' module names or ldm's original ones. Every key that
names no module of the model is reported, never skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoints import CheckpointMismatchError, read_state_dict, save_weights
from ldm.interchange.clip_text import HF_PREFIX, open_clip_text_to_hf
from ldm.interchange.diffusers_keys import ldm_unet_to_diffusers
from ldm.interchange.original_configs import unet_config_from_weights

LAYOUTS = ("diffusers", "kohya")
COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# peft wraps an adapted layer and keeps the original one as ``base_layer``; names here are the original ones.
_PEFT_WRAPPER = re.compile(r"\.base_layer(?=\.)")
_PEFT_SUFFIX = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_down|lora_up)(\.default)?\.weight$")


@dataclass
class LoraWeights:
    """One adapted layer: ``down`` (r, in) or (r, in, kh, kw); ``up`` (out, r) or (out, r, 1, 1); its update
    is ``alpha / r * up @ down`` (a convolution's composed over its channels)."""

    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float = 1.0) -> Tensor:
        """The weight update ``scale * alpha / r * up @ down`` in the adapted layer's weight shape."""
        factor = scale * self.alpha / self.rank
        down, up = self.down.float(), self.up.float()
        if down.ndim == 2:
            return factor * up @ down
        return factor * torch.einsum("or,rikl->oikl", up.flatten(1), down)


def plain_key(key: str) -> str:
    """A state-dict key of a peft-wrapped model under the original layer's name (``base_layer`` removed)."""
    return _PEFT_WRAPPER.sub("", key)


def plain_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` without peft's adapters and with adapted layers under their original names."""
    return {plain_key(key): value for key, value in module.state_dict().items() if ".lora_" not in key}


class LoraNames:
    """The names each adaptable layer of a model has in diffusers' layout, for one U-Net and text encoder.

    ``unet``: ldm module path -> diffusers module path; ``text_encoder``: OpenCLIP path -> transformers path.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None) -> None:
        self.unet = self._unet_names(unet)
        self.text_encoder = self._text_names(text_encoder) if text_encoder is not None else {}
        self.shapes = {f"unet.{key.removesuffix('.weight')}": value.shape
                       for key, value in plain_state_dict(unet).items() if key.endswith(".weight")}
        if text_encoder is not None:
            self.shapes.update({f"text_encoder.{key.removesuffix('.weight')}": value.shape
                                for key, value in plain_state_dict(text_encoder.tower).items()
                                if key.endswith(".weight")})

    @staticmethod
    def _unet_names(unet: nn.Module) -> dict[str, str]:
        state = plain_state_dict(unet)
        layers_per_block = unet_config_from_weights(state)["num_res_blocks"]
        weights = {key: value for key, value in state.items() if key.endswith(".weight")}
        converted = ldm_unet_to_diffusers(weights, layers_per_block)
        # the conversion keeps the order of its input, so the two key lists pair up
        return {ldm_key.removesuffix(".weight"): diffusers_key.removesuffix(".weight")
                for ldm_key, diffusers_key in zip(weights, converted)}

    @staticmethod
    def _text_names(text_encoder: nn.Module) -> dict[str, str]:
        names = {}
        for key, value in plain_state_dict(text_encoder.tower).items():
            # q, k and v are one packed matrix in OpenCLIP: no single transformers layer corresponds to it
            if not key.endswith(".weight") or ".attn.in_proj" in key:
                continue
            try:
                (hf_key,) = open_clip_text_to_hf({key: value})
            except CheckpointMismatchError:
                continue
            names[key.removesuffix(".weight")] = hf_key.removesuffix(".weight")
        return names

    def table(self, component: str) -> dict[str, str]:
        return self.unet if component == "unet" else self.text_encoder

    def check(self, adapters: Mapping[str, LoraWeights], source: str) -> None:
        """Every adapter must name a layer of this model with the shapes of that layer."""
        problems = []
        for name, weights in adapters.items():
            shape = self.shapes.get(name)
            if shape is None:
                problems.append(f"{name} (no such layer)")
                continue
            expected_down = (weights.rank, shape[1], *shape[2:])
            expected_up = (shape[0], weights.rank, *([1, 1] if len(shape) == 4 else []))
            if tuple(weights.down.shape) != expected_down or tuple(weights.up.shape) != expected_up:
                problems.append(f"{name} (down {tuple(weights.down.shape)}, up {tuple(weights.up.shape)} for a "
                                f"layer of weight {tuple(shape)})")
        if problems:
            raise CheckpointMismatchError(f"{source}: {len(problems)} LoRA layer(s) do not fit this model: "
                                          + ", ".join(sorted(problems)[:20]))


def adapters_to_layout(adapters: Mapping[str, LoraWeights], names: LoraNames, layout: str) -> dict[str, Tensor]:
    """ldm's adapters -> the tensors of a ``layout`` file (``diffusers`` or ``kohya``), in diffusers' names."""
    if layout not in LAYOUTS:
        raise ValueError(f"LoRA layout {layout!r} is unknown; choose one of {LAYOUTS}")
    state: dict[str, Tensor] = {}
    for name, weights in adapters.items():
        component, module = name.split(".", 1)
        foreign = names.table(component).get(module)
        if foreign is None:
            raise CheckpointMismatchError(f"the adapted layer {name} has no name in diffusers' layout")
        if layout == "diffusers":
            if component == "text_encoder":
                raise ValueError(f"the text-tower adapter {name} cannot be written in the diffusers layout (diffusers "
                                 "loads text-encoder LoRA on attention projections only); write the kohya layout")
            state[f"{component}.{foreign}.lora_A.weight"] = weights.down.contiguous()
            state[f"{component}.{foreign}.lora_B.weight"] = (weights.up * (weights.alpha / weights.rank)).contiguous()
        else:
            stem = KOHYA_PREFIXES[component] + foreign.replace(".", "_")
            state[f"{stem}.lora_down.weight"] = weights.down.contiguous()
            state[f"{stem}.lora_up.weight"] = weights.up.contiguous()
            state[f"{stem}.alpha"] = torch.tensor(float(weights.alpha))
    return state


def _lookup(names: LoraNames) -> dict[str, str]:
    """Every spelling a file may use for a layer -> ldm's ``component.module`` name."""
    lookup = {}
    for component in COMPONENTS:
        for ours, theirs in names.table(component).items():
            full = f"{component}.{ours}"
            spellings = [f"{component}.{theirs}", full]
            if component == "text_encoder":
                spellings.append(f"{component}.{theirs.removeprefix(HF_PREFIX)}")
            spellings += [KOHYA_PREFIXES[component] + theirs.replace(".", "_"),
                          KOHYA_PREFIXES[component] + ours.replace(".", "_")]
            lookup.update(dict.fromkeys(spellings, full))
    return lookup


def adapters_from_layout(state: Mapping[str, Tensor], names: LoraNames, source: str = "LoRA file"
                         ) -> dict[str, LoraWeights]:
    """The tensors of a LoRA file in either layout, with diffusers' or ldm's module names -> ldm's adapters.

    Raises ``CheckpointMismatchError`` naming every key that places on no layer, every layer that lacks
    its down or up matrix, and every layer whose shapes differ from the model's.
    """
    lookup = _lookup(names)
    parts: dict[str, dict[str, Tensor]] = {}
    unplaced = []
    for key, tensor in state.items():
        stem, kind = key, None
        match = _PEFT_SUFFIX.match(key)
        if match is not None:
            stem, kind = match["module"], {"lora_A": "down", "lora_B": "up"}.get(match["part"], match["part"][5:])
        elif key.endswith(".alpha"):
            stem, kind = key.removesuffix(".alpha"), "alpha"
        target = lookup.get(stem) if kind else None
        if target is None:
            unplaced.append(key)
            continue
        parts.setdefault(target, {})[kind] = tensor
    if unplaced:
        raise CheckpointMismatchError(f"{source}: {len(unplaced)} key(s) name no layer of this model: "
                                      + ", ".join(sorted(unplaced)[:20]))
    adapters = {}
    for name, found in parts.items():
        if "down" not in found or "up" not in found:
            missing = "up" if "down" in found else "down"
            raise CheckpointMismatchError(f"{source}: the layer {name} has no {missing} matrix")
        rank = int(found["down"].shape[0])
        alpha = float(found["alpha"]) if "alpha" in found else float(rank)
        adapters[name] = LoraWeights(down=found["down"], up=found["up"], alpha=alpha)
    names.check(adapters, source)
    return adapters


def write_lora_file(path: str | Path, adapters: Mapping[str, LoraWeights], names: LoraNames,
                    layout: str = "diffusers") -> Path:
    """Write adapters as one ``.safetensors`` file in ``layout``."""
    if not adapters:
        raise ValueError("no LoRA layers to write")
    state = adapters_to_layout(adapters, names, layout)
    return save_weights(state, path, metadata={"format": "pt", "ldm_lora_layout": layout})


def read_lora_file(path: str | Path, names: LoraNames) -> dict[str, LoraWeights]:
    """The adapters of a LoRA ``.safetensors`` file in any layout ``adapters_from_layout`` reads."""
    return adapters_from_layout(read_state_dict(path), names, source=str(path))


@torch.no_grad()
def merge_lora(modules: Mapping[str, nn.Module], adapters: Mapping[str, LoraWeights], scale: float = 1.0) -> None:
    """Add ``scale * alpha / r * up @ down`` to each adapted layer's weight, in place.

    ``modules``: ``{"unet": unet, "text_encoder": text encoder tower}`` (the components the names start with).
    """
    for name, weights in adapters.items():
        component, module_name = name.split(".", 1)
        if component not in modules:
            raise CheckpointMismatchError(f"the LoRA layer {name} adapts a {component}, which is not given")
        layer = modules[component].get_submodule(module_name)
        layer.weight.add_(weights.delta(scale).to(layer.weight.dtype).to(layer.weight.device))
