"""The Stable Diffusion U-Net: ResBlocks with timestep embedding and spatial transformers.

Module and parameter names follow the original checkpoints (``time_embed``, ``input_blocks``,
``middle_block``, ``output_blocks``, ``out``), so ``model.diffusion_model.*`` tensors of an SD 1.x
or 2.x checkpoint load with no renaming. One class serves every preset; presets are configs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.conditioning import Conditioning
from ldm.models.attention import SpatialTransformer
from ldm.models.layers import Upsample, group_norm


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B, dim) of timesteps (B,), int or fractional: cosines then sines."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    angles = timesteps.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the timestep embedding (added, or scale-shift after the second
    norm), then GroupNorm-SiLU-dropout-conv, with a skip connection (1x1 conv if widths differ)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 use_scale_shift_norm: bool = False, norm_num_groups: int = 32, use_checkpoint: bool = False) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            group_norm(channels, norm_num_groups, eps=1e-5, owner="UNetModel"), nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            group_norm(out_channels, norm_num_groups, eps=1e-5, owner="UNetModel"), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (key ``op``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose ResBlocks get the timestep embedding and transformers the context."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Noise-prediction U-Net of Stable Diffusion (1.x, 2.x and SDXL), configured by its arguments.

    ``attention_resolutions`` are downsampling factors (1 = the latent resolution) at which a
    SpatialTransformer follows each ResBlock. Heads: ``num_heads`` per block, or, when
    ``num_head_channels`` > 0 (SD 2.x: 64), channels // num_head_channels.
    ``transformer_depth``: blocks per SpatialTransformer, one number or one per level of
    ``channel_mult`` (SDXL: [1, 2, 10], the first unused as level 0 has no attention);
    ``transformer_depth_middle`` that of the middle block (default: the last level's).
    ``adm_in_channels``: width of an extra conditioning vector ``y`` (SDXL: 2816, the pooled text
    embedding and the size embeddings), mapped by ``label_emb`` (Linear-SiLU-Linear) and added to the
    timestep embedding; None for none.
    Speed options: ``use_checkpoint`` recomputes each block's activations in the backward pass
    (less memory, ~30% more compute); ``channels_last`` keeps weights and activations in NHWC
    memory order, which convolutions on tensor cores prefer. Attention always runs through
    ``scaled_dot_product_attention``; ``upcast_attention`` computes it in fp32 (SD 2.x at 768 px).
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_heads: int = 8,
        num_head_channels: int = -1,
        context_dim: int | None = 768,
        transformer_depth: int | Sequence[int] = 1,
        transformer_depth_middle: int | None = None,
        adm_in_channels: int | None = None,
        use_linear_in_transformer: bool = False,
        use_scale_shift_norm: bool = False,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        upcast_attention: bool = False,
        use_checkpoint: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        depths = [int(transformer_depth)] * len(channel_mult) if isinstance(transformer_depth, int) \
            else [int(depth) for depth in transformer_depth]
        if len(depths) != len(channel_mult) or min(depths) < 0:
            raise ValueError(f"transformer_depth={transformer_depth}: give one number >= 0 or one per level of "
                             f"channel_mult ({len(channel_mult)} levels)")
        middle_depth = depths[-1] if transformer_depth_middle is None else int(transformer_depth_middle)
        if middle_depth < 1:
            raise ValueError(f"transformer_depth_middle={middle_depth} must be at least 1 (the middle block always "
                             "has a transformer)")
        self.adm_in_channels = adm_in_channels
        attention_resolutions = set(attention_resolutions)
        reachable = {2**level for level in range(len(channel_mult))}
        if not attention_resolutions <= reachable:
            raise ValueError(
                f"attention_resolutions={sorted(attention_resolutions)} names downsampling factors this U-Net never "
                f"reaches; with channel_mult of length {len(channel_mult)} choose from {sorted(reachable)}"
            )
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if adm_in_channels is not None:
            # Nested as in the original SDXL checkpoints (label_emb.0.0.*, label_emb.0.2.*).
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
            ))

        def res_block(channels: int, out: int) -> ResBlock:
            return ResBlock(channels, time_embed_dim, out, dropout, use_scale_shift_norm, norm_num_groups,
                            use_checkpoint)

        def transformer(channels: int, depth: int) -> SpatialTransformer:
            if num_head_channels > 0:
                if channels % num_head_channels:
                    raise ValueError(f"num_head_channels={num_head_channels} does not divide a transformer's "
                                     f"{channels} channels; choose a divisor of model_channels * each channel_mult")
                heads, dim_head = channels // num_head_channels, num_head_channels
            else:
                if channels % num_heads:
                    raise ValueError(f"num_heads={num_heads} does not divide a transformer's {channels} channels; "
                                     f"choose a divisor of model_channels * each channel_mult or set num_head_channels")
                heads, dim_head = num_heads, channels // num_heads
            return SpatialTransformer(channels, heads, dim_head, depth, context_dim, dropout,
                                      use_linear_in_transformer, norm_num_groups, upcast_attention, use_checkpoint)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        channels, factor = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(channels, model_channels * mult)]
                channels = model_channels * mult
                if factor in attention_resolutions:
                    layers.append(transformer(channels, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(channels)))
                skip_channels.append(channels)
                factor *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(channels, channels), transformer(channels, middle_depth), res_block(channels, channels)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(num_res_blocks + 1):
                layers = [res_block(channels + skip_channels.pop(), model_channels * mult)]
                channels = model_channels * mult
                if factor in attention_resolutions:
                    layers.append(transformer(channels, depths[level]))
                if level and index == num_res_blocks:
                    layers.append(Upsample(channels))
                    factor //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(channels, norm_num_groups, eps=1e-5, owner="UNetModel"), nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, timesteps: Tensor, context: Conditioning | Tensor | None = None,
                y: Tensor | None = None) -> Tensor:
        """x (B, in_channels, H, W), timesteps (B,) int or float, context (B, L, context_dim), y (B,
        adm_in_channels) when the U-Net has ``adm_in_channels`` -> (B, out_channels, H, W). H and W must be
        divisible by ``downsample_factor``; a single timestep (0-dim or (1,)) is used for the whole batch.

        The network contract's ``Conditioning`` gives both: its ``tokens`` are the context and its ``vector`` is y
        (SD's U-Nets attend to every token, so a token mask is not used). SD's own call (context and y as
        tensors) works too, as SD's U-Net is called."""
        if isinstance(context, Conditioning):
            context, y = context.tokens, context.vector
        self._check_inputs(x, context, y)
        timesteps = timesteps.reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        h = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def _check_inputs(self, x: Tensor, context: Tensor | None, y: Tensor | None) -> None:
        if x.shape[-2] % self.downsample_factor or x.shape[-1] % self.downsample_factor:
            raise ValueError(f"UNetModel input of spatial size {tuple(x.shape[-2:])} is not divisible by "
                             f"{self.downsample_factor} (2 ** (len(channel_mult) - 1)); resize or crop the latents")
        if self.context_dim is None:
            if context is not None:
                raise ValueError("UNetModel was built with context_dim=None but got a context; pass context=None "
                                 "or set context_dim to the text encoder's width")
        elif context is None or context.shape[-1] != self.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"UNetModel needs context (B, L, {self.context_dim}) (context_dim={self.context_dim}), "
                             f"got {got}; pass the text encoder's output (an empty prompt's for unconditional)")
        if (y is None) != (self.adm_in_channels is None) or (y is not None and y.shape != (x.shape[0], self.adm_in_channels)):
            got = None if y is None else tuple(y.shape)
            raise ValueError(f"UNetModel was built with adm_in_channels={self.adm_in_channels} but got y of shape {got}; "
                             f"pass y (B, adm_in_channels) exactly when adm_in_channels is set (SDXL: the conditioner's "
                             f"pooled text and size embeddings)")
