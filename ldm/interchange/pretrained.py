"""Start a model from released weights: an original SD single file or a diffusers folder.

``load_pretrained`` fills ldm's U-Net, VAE and (when the weights carry one) OpenCLIP text tower in
place, strictly: every missing, unexpected or misshapen key is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ldm.checkpoints import CheckpointMismatchError, check_keys, check_state_dict
from ldm.interchange.clip_text import used_text_keys
from ldm.interchange.diffusers_folder import read_diffusers_folder, text_encoder_layers
from ldm.interchange.original_file import read_original_checkpoint


def read_pretrained(path: str | Path, use_ema: bool = False) -> dict[str, Any]:
    """Weights of a diffusers folder (a directory with ``unet/``) or an original SD single file
    (``.ckpt``/``.safetensors``): ``{"unet", "vae"}`` in ldm's keys, maybe ``"text_encoder"`` (OpenCLIP
    keys) and ``"latent_scale_factor"``."""
    path = Path(path)
    if path.is_dir():
        if use_ema:
            raise ValueError(f"{path} is a diffusers folder, which holds one U-Net; use_ema applies to original "
                             "single files with model_ema weights")
        return read_diffusers_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"no pretrained weights at {path}: give an original SD .ckpt/.safetensors file "
                                "or a diffusers folder")
    return read_original_checkpoint(path, use_ema=use_ema)


def load_text_tower(text_encoder: nn.Module, state_dict: dict[str, Tensor] | list[dict[str, Tensor]], source: str,
                    pooled: bool = False) -> None:
    """Load OpenCLIP text-tower weights into a ``FrozenOpenCLIPTextEncoder``'s tower, or a list of them into
    the towers of a ``TextConditioner`` (SDXL).

    Required are the blocks the context passes through (SD 2.x's diffusers text encoder lacks the
    last block, which the penultimate layer never uses); the last block is loaded when present, so
    a round trip keeps it. The pooled projection is needed only where the pooled embedding is used
    (``pooled``: the conditioner's ``pooled_encoder``), with every block and the final LayerNorm.
    """
    towers = getattr(text_encoder, "text_encoders", None)
    if towers is not None or isinstance(state_dict, list):
        given_towers = state_dict if isinstance(state_dict, list) else [state_dict]
        if towers is None or len(towers) != len(given_towers):
            raise CheckpointMismatchError(
                f"{source} holds {len(given_towers)} text tower(s) but model.text_encoder has "
                f"{'one' if towers is None else len(towers)}; choose the text encoder of its kind (SDXL: "
                "model/text_encoder=sdxl)")
        for index, (tower, tower_state) in enumerate(zip(towers, given_towers)):
            load_text_tower(tower, tower_state, f"{source} tower {index}", pooled=index == text_encoder.pooled_encoder)
        return
    used_blocks = text_encoder_layers(text_encoder, pooled=pooled)
    tower = used_text_keys(text_encoder.tower.state_dict(), with_projection=pooled)
    given = used_text_keys(state_dict, with_projection=pooled)
    required = {key for key in tower
                if not key.startswith("transformer.resblocks.") or int(key.split(".")[2]) < used_blocks}
    expected = {key: value for key, value in tower.items() if key in required or key in given}
    check_keys(expected, given, source=source, target="the text encoder's OpenCLIP tower")
    text_encoder.tower.load_state_dict(given, strict=False)


def load_pretrained(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, path: str | Path,
                    use_ema: bool = False) -> dict[str, Any]:
    """Load released weights into the modules (``text_encoder`` None: leave it as built).

    A ``text_encoder`` given but absent from the weights is an error, so that a fine-tune never
    runs on a randomly initialised tower by accident. Returns ``{"latent_scale_factor": float | None}``.
    """
    parts = read_pretrained(path, use_ema=use_ema)
    for name, module in (("unet", unet), ("vae", vae)):
        check_state_dict(module, parts[name], source=f"{path} ({name})")
        module.load_state_dict(parts[name])
    if text_encoder is not None:
        if "text_encoder" not in parts:
            raise CheckpointMismatchError(
                f"{path} holds no text encoder weights; set model.mode.pretrained.text_encoder=false and give the text "
                "encoder its own weights (model.text_encoder.pretrained: a hub tag or a local file)")
        load_text_tower(text_encoder, parts["text_encoder"], source=f"{path} (text encoder)")
    return {"latent_scale_factor": parts.get("latent_scale_factor")}


@dataclass(frozen=True)
class PretrainedWeights:
    """Released weights to start from (``model.mode.pretrained``): ``path`` an original SD
    ``.ckpt``/``.safetensors`` or a diffusers folder; ``use_ema`` takes a single file's EMA U-Net;
    ``text_encoder`` loads its text tower too (else the text encoder keeps its own weights)."""

    path: str
    use_ema: bool = False
    text_encoder: bool = True

    def __post_init__(self) -> None:
        if not str(self.path).strip():
            raise ValueError("model.mode.pretrained.path is empty: give an original SD .ckpt/.safetensors file or a "
                             "diffusers folder")
