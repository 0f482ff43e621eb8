"""Transformer blocks of the U-Net: self-attention, cross-attention to text tokens, GEGLU feed-forward.

Parameter names follow the original Stable Diffusion checkpoints (``proj_in``,
``transformer_blocks.N.attn1.to_q``, ``ff.net.0.proj``, ...), so their weights load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.models.layers import group_norm


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, N, query_dim) over keys/values from ``context``
    (B, M, context_dim), or over the queries themselves when no context is given."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, upcast_attention: bool = False) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def attention_probs(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The attention weights (B, heads, N, M) that ``forward`` applies: softmax(q k^T / sqrt(dim_head)),
        each query's distribution over the M context tokens (or the N queries without a context).

        ``forward`` never forms this matrix (``scaled_dot_product_attention`` fuses it away); this is
        for looking at where the model attends, e.g. which pixels read a caption's colour word.
        """
        context = x if context is None else context
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2).float()
        k = self.to_k(context).unflatten(-1, (self.heads, -1)).transpose(1, 2).float()
        return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        batch, length, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        if self.upcast_attention:
            # SD 2.x attention overflows in fp16 at 768 px; compute it in fp32.
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(v.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))


class GEGLU(nn.Module):
    """Gated GELU: proj (dim -> 2 * inner_dim), then value * gelu(gate)."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., inner_dim)."""
        if type(self.proj) is nn.Linear:
            # Two products with the weight's halves give contiguous value and gate: gelu, the product and
            # their backward run on strided halves of one (..., 2 * inner_dim) output at about half the
            # speed, and the chunk's backward adds a concatenation (benchmarks/train_step.py).
            weight, bias = self.proj.weight, self.proj.bias
            half = weight.shape[0] // 2
            return F.linear(x, weight[:half], bias[:half]) * F.gelu(F.linear(x, weight[half:], bias[half:]))
        # A wrapped projection (a LoRA adapter) must be called as a module.
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4x inner width."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, then feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, dropout: float = 0.0,
                 upcast_attention: bool = False, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout, upcast_attention)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout, upcast_attention)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (B, C, H, W), conditioned on context (B, M, D).

    ``use_linear=True`` (SD 2.x) projects in and out with linear layers after flattening, else with
    1x1 convolutions before (SD 1.x). The output projection starts at zero, so a new block is an
    identity.
    """

    def __init__(self, in_channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int | None = None,
                 dropout: float = 0.0, use_linear: bool = False, norm_num_groups: int = 32,
                 upcast_attention: bool = False, use_checkpoint: bool = False) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = group_norm(in_channels, norm_num_groups, eps=1e-6, owner="UNetModel")
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, dropout, upcast_attention, use_checkpoint)
            for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h
