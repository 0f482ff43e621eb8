"""Weights that come from fixed files: loading them, recording them in checkpoints, and checking the record.

A run's frozen VAE may come from ``model.latents.vae_weights`` (stage 1's file) and its network, VAE and text
tower from released weights (``model.mode.pretrained``). Checkpoints leave those weights out and record each
file's path, size and sha256 instead; resuming checks that the files are the ones the checkpoint was trained with.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ldm.checkpoints import load_weights
from ldm.interchange.frozen_files import FrozenFileError, describe_file
from ldm.interchange.pretrained import PretrainedWeights, load_pretrained

OPTION_OF_RECORD = {"vae_weights": "model.latents.vae_weights", "pretrained": "model.mode.pretrained.path"}


def check_vae_weights_exist(vae_weights: str | None) -> None:
    """A clear error, before anything is built, when the stage-1 VAE file is missing."""
    if vae_weights and not os.path.isfile(vae_weights):
        raise FileNotFoundError(
            f"model.latents.vae_weights={vae_weights} does not exist: train stage 1 first (for the demo: python "
            f"train.py experiment=demo_vae, or make demo), or set model.latents.vae_weights to an existing VAE "
            f"weights file")


def load_frozen_weights(network: nn.Module, vae: nn.Module, text_encoder: nn.Module, vae_weights: str | None,
                        pretrained: PretrainedWeights | None) -> float | None:
    """Load ``pretrained`` (network, VAE and, with its ``text_encoder``, the text tower), then ``vae_weights`` over
    the VAE; returns the latent scale factor the files record (the VAE file's wins), or None."""
    stored_scale = None
    if pretrained:
        stored_scale = load_pretrained(network, vae, text_encoder if pretrained.text_encoder else None,
                                       pretrained.path, use_ema=pretrained.use_ema)["latent_scale_factor"]
    if vae_weights:
        metadata = load_weights(vae, vae_weights)
        stored_scale = float(metadata["latent_scale_factor"]) if "latent_scale_factor" in metadata else None
    return stored_scale


def describe_frozen_files(vae_weights: str | None, pretrained: PretrainedWeights | None) -> dict[str, dict[str, Any]]:
    """What checkpoints record of each file whose weights they leave out (path, size, sha256)."""
    records = {}
    if vae_weights:
        records["vae_weights"] = describe_file(vae_weights)
    if pretrained:
        records["pretrained"] = {**describe_file(pretrained.path), "use_ema": pretrained.use_ema,
                                 "text_encoder": pretrained.text_encoder}
    return records


def prefixes_from_files(vae_weights: str | None, pretrained: PretrainedWeights | None) -> tuple[str, ...]:
    """State-dict prefixes of the submodules whose weights come from a fixed file, which checkpoints skip."""
    prefixes = ("vae.",) if (vae_weights or pretrained) else ()
    return prefixes + (("text_encoder.",) if pretrained and pretrained.text_encoder else ())


def check_frozen_files(recorded: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> None:
    """Frozen weights left out of a checkpoint are loaded from their file when the module is built: it must be
    the file the checkpoint was trained with (same sha256)."""
    for name, record in recorded.items():
        now = current.get(name)
        if now is not None and now["sha256"] != record["sha256"]:
            raise FrozenFileError(f"{OPTION_OF_RECORD[name]}={now['path']} has sha256 {now['sha256']}, but the "
                                  f"checkpoint was trained with {record['path']} of sha256 {record['sha256']}")
