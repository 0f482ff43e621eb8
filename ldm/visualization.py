"""Image grids with captions, for sample logging and reports."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def to_pil_images(images: Tensor) -> list[Image.Image]:
    """Images (N, 3, H, W) in [0, 1] -> PIL RGB images."""
    array = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(image)) for image in array]


def captioned_grid(images: Sequence[Image.Image], captions: Sequence[str], columns: int = 6,
                   tile_size: int = 128, caption_lines: int = 3) -> Image.Image:
    """A grid of images, each enlarged to ``tile_size`` (nearest, so pixels stay visible) with its caption below."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    font = ImageFont.load_default(size=11)
    line_height = 13
    chars_per_line = max(8, tile_size // 6)
    cell_height = tile_size + caption_lines * line_height + 6
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * tile_size + (columns + 1) * 4, rows * cell_height + 4), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, caption) in enumerate(zip(images, captions)):
        left = 4 + (index % columns) * (tile_size + 4)
        top = 4 + (index // columns) * cell_height
        grid.paste(image.resize((tile_size, tile_size), Image.NEAREST), (left, top))
        lines = textwrap.wrap(caption, chars_per_line)[:caption_lines]
        for line_index, line in enumerate(lines):
            draw.text((left, top + tile_size + 2 + line_index * line_height), line, fill="black", font=font)
    return grid
