"""Image grids with captions, for sample logging and reports."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def to_pil_images(images: Tensor | Sequence[Tensor]) -> list[Image.Image]:
    """Images (N, 3, H, W) in [0, 1], or a list of (3, H_i, W_i) of any sizes -> PIL RGB images."""
    if not isinstance(images, Tensor):
        return [image for item in images for image in to_pil_images(item[None])]
    array = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(image)) for image in array]


def captioned_grid(images: Sequence[Image.Image], captions: Sequence[str], columns: int = 6,
                   tile_size: int = 128, caption_lines: int = 3) -> Image.Image:
    """A grid of images with their captions below, each enlarged (nearest, so pixels stay visible) until its long
    side is ``tile_size`` and centred in a ``tile_size`` square cell: images of different sizes and aspect
    ratios share one grid without being stretched."""
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
        scale = tile_size / max(image.size)
        fitted = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
        grid.paste(fitted, (left + (tile_size - fitted.width) // 2, top + (tile_size - fitted.height) // 2))
        lines = textwrap.wrap(caption, chars_per_line)[:caption_lines]
        for line_index, line in enumerate(lines):
            draw.text((left, top + tile_size + 2 + line_index * line_height), line, fill="black", font=font)
    return grid
