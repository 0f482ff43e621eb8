"""Whether a built-in-set image's shape lies wholly inside the frame, by pixel statistics.

SDXL's crop conditioning is meant to let a model trained on cropped images draw whole, framed objects at
crop (0, 0); on the built-in data (one flat shape on a flat background) that is measurable without a learned
model: the shape is every pixel far from the background colour, and it is wholly inside the frame when none
of those pixels lies on the image's outermost rows and columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

# A pixel is the shape's when its colour differs from the background's by more than this (L-inf, in [0, 1]):
# the built-in set's colours differ from every background by at least 0.5 in one channel.
FOREGROUND_THRESHOLD = 0.25
# An image shows a shape at all when that many of its pixels are foreground (a 32 px image's shapes cover ~10%).
MIN_FOREGROUND_SHARE = 0.01


def background_colour(images: Tensor) -> Tensor:
    """The per-image median colour (N, 3) of the border pixels of images (N, 3, H, W) in [0, 1]: the
    background, which covers most of every border even where the shape touches it."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    return border.median(dim=-1).values


def shape_inside_frame(images: Tensor) -> Tensor:
    """(N,) bool: the image shows a shape (enough foreground pixels) and no foreground pixel touches the border.
    images: (N, 3, H, W) in [0, 1]."""
    background = background_colour(images)[:, :, None, None]
    foreground = (images - background).abs().amax(dim=1) > FOREGROUND_THRESHOLD  # (N, H, W)
    border = torch.zeros_like(foreground[0])
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    touches = (foreground & border).flatten(1).any(dim=1)
    visible = foreground.float().flatten(1).mean(dim=1) >= MIN_FOREGROUND_SHARE
    return visible & ~touches
