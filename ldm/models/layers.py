"""Small blocks shared by the U-Net and the autoencoder."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, groups: int, eps: float, owner: str) -> nn.GroupNorm:
    """GroupNorm over ``channels``; a ValueError naming ``owner``'s ``norm_num_groups`` if it does not divide them."""
    if channels % groups:
        raise ValueError(
            f"{owner}: norm_num_groups={groups} does not divide a layer's {channels} channels; set "
            f"norm_num_groups to a common divisor of every channel count (base width times each multiplier)"
        )
    return nn.GroupNorm(groups, channels, eps=eps)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution (key ``conv``): (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
