"""AutoencoderKL of Stable Diffusion: a convolutional encoder to a diagonal Gaussian latent, and a decoder.

Parameter names follow the original checkpoints (``encoder.down.0.block.0.norm1``,
``decoder.up.3.upsample.conv``, ``quant_conv``, ...), so ``first_stage_model.*`` tensors load
unchanged. One class serves the SD VAE (f=8) and the tiny demo presets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.layers import Upsample, group_norm


class DiagonalGaussianDistribution:
    """Gaussian with diagonal covariance from moments (B, 2C, h, w) = (mean, log-variance)."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A draw (B, C, h, w) by reparameterisation."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL divergence to N(0, I), summed over (C, h, w): (B,)."""
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return group_norm(channels, groups, eps=1e-6, owner="AutoencoderKL")


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, with a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, with 1x1-conv q, k, v and output projection."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (layer(h).flatten(2).transpose(1, 2)[:, None] for layer in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding right and bottom by one (the original's asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = 2 ** (levels - 1)."""

    def __init__(self, in_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 attn_resolutions: Sequence[int], resolution: int, dropout: float, double_z: bool, groups: int,
                 mid_attention: bool) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, current_resolution = ch, resolution
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult, dropout, groups))
                block_in = ch * mult
                if current_resolution in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                current_resolution //= 2
            else:
                stage.downsample = nn.Identity()
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups) if mid_attention else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, groups)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for index, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[index](h)
            h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> images (B, out_channels, h*f, w*f).

    ``up[i]`` works at level i, so ``up[-1]`` runs first, as in the original checkpoints.
    """

    def __init__(self, out_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 attn_resolutions: Sequence[int], resolution: int, dropout: float, groups: int,
                 mid_attention: bool) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups) if mid_attention else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, groups)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * ch_mult[level], dropout, groups))
                block_in = ch * ch_mult[level]
                if current_resolution in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != 0:
                stage.upsample = Upsample(block_in)
                current_resolution *= 2
            else:
                stage.upsample = nn.Identity()
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for index, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[index](h)
            h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: ``encode`` gives a posterior over latents (B, embed_dim, H/f, W/f),
    ``decode`` maps latents back to images (B, out_channels, H, W) in about [-1, 1]."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        embed_dim: int = 4,
        attn_resolutions: Sequence[int] = (),
        resolution: int = 256,
        dropout: float = 0.0,
        double_z: bool = True,
        norm_num_groups: int = 32,
        mid_attention: bool = True,
    ) -> None:
        super().__init__()
        if not double_z:
            raise ValueError("AutoencoderKL needs double_z=True: the encoder outputs a mean and a log-variance")
        self.embed_dim = embed_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(in_channels, ch, ch_mult, num_res_blocks, z_channels, attn_resolutions, resolution,
                               dropout, double_z, norm_num_groups, mid_attention)
        self.decoder = Decoder(out_channels, ch, ch_mult, num_res_blocks, z_channels, attn_resolutions, resolution,
                               dropout, norm_num_groups, mid_attention)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """Images (B, 3, H, W) in [-1, 1] -> posterior over latents (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, embed_dim, h, w) -> images (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
