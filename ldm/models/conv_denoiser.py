"""A denoising network of a few convolutions: the smallest family that meets the network contract.

It shows what a family needs and nothing more (docs/architecture.md, "Adding a network family"): the input
latents, the timestep and a ``Conditioning`` in, a prediction of the latents' shape out. The caption enters as
the mean of its token states (over real tokens where the conditioning has a mask), which with the timestep
scales and shifts every layer's channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.conditioning import Conditioning
from ldm.models.unet import timestep_embedding


class ConvDenoiser(nn.Module):
    """``num_layers`` residual 3x3 convolutions of ``channels`` channels between an input and an output
    convolution, each modulated per channel (scale, shift) by the timestep embedding plus the projected mean
    token state. ``in_channels`` / ``out_channels``: the latents'; ``context_dim``: the token states' width."""

    def __init__(self, in_channels: int = 4, out_channels: int = 4, channels: int = 32, num_layers: int = 3,
                 context_dim: int = 64) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.context_dim = context_dim
        self.channels = channels
        self.downsample_factor = 1  # no downsampling: any latent size works
        self.time_mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 2 * channels))
        self.context_proj = nn.Linear(context_dim, 2 * channels)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.layers = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_layers))
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        """x (B, in_channels, H, W), timesteps (B,) or one for the batch, cond.tokens (B, L, context_dim) ->
        (B, out_channels, H, W)."""
        timesteps = timesteps.reshape(-1).expand(x.shape[0])
        tokens = cond.tokens.to(x.dtype)
        if cond.mask is None:
            pooled = tokens.mean(dim=1)
        else:
            weights = cond.mask.to(x.dtype)[..., None]
            pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        embedding = self.time_mlp(timestep_embedding(timesteps, self.channels).to(x.dtype)) + self.context_proj(pooled)
        scale, shift = embedding[:, :, None, None].chunk(2, dim=1)
        h = self.conv_in(x)
        for layer in self.layers:
            h = h + layer(F.silu(h * (1 + scale) + shift))
        return self.conv_out(F.silu(h))
