"""``model.latents``: where the training latents come from and how they are drawn and laid out."""

from __future__ import annotations

from dataclasses import dataclass

from ldm.config_check import check_number


@dataclass(frozen=True)
class LatentOptions:
    """``vae_weights``: the frozen VAE's weights file (stage 1's, e.g. models/demo/vae.safetensors), or None for
    the VAE as built (or as ``model.mode.pretrained`` loads it).
    ``scale_factor``: the latent scale factor; None reads it from the VAE weights file's metadata (stage 1 stores
    the value it measured on the data), else it is measured as 1/std of the first training batch's latents.
    ``sample_posterior``: draw latents from the VAE posterior (mean + std * eps) rather than take its mean.
    ``channels_last``: the network's input (so its activations) in channels-last memory order, which oneDNN's CPU
    convolutions run faster (benchmarks/train_step.py); the weights keep their order, so saved files are unchanged.
    """

    vae_weights: str | None = None
    scale_factor: float | None = None
    sample_posterior: bool = True
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.scale_factor is not None:
            check_number("model.latents.scale_factor", self.scale_factor, minimum=0.0, strict_minimum=True)
