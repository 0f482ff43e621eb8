"""Image decoding and geometry for the shard pipeline: draft-mode JPEG decoding, resize, crop, flip."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def open_image(data: bytes) -> Image.Image:
    """Open image bytes lazily: only the header is read, so ``.size`` is known before any decoding."""
    return Image.open(io.BytesIO(data))


def decode_rgb(image: Image.Image, resolution: int) -> Image.Image:
    """Decode an opened image to RGB. JPEGs are decoded at the largest power-of-two reduction (1/2,
    1/4, 1/8; PIL's draft mode, done inside libjpeg) whose short side stays >= ``resolution``, which
    is several times faster for images much larger than the training size."""
    image.draft("RGB", (resolution, resolution))
    image.load()
    return image if image.mode == "RGB" else to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of an image; transparent pixels are put on white, as a browser shows them."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(
    image: Image.Image, resolution: int, rng: np.random.Generator | None
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the short side to ``resolution`` (bicubic, antialiased) and crop a square of that side:
    at random when ``rng`` is given, else centred. Returns the crop and its (top, left) in the resized image.

    Only the source region under the crop is resampled (PIL's ``box``), which gives the pixels of
    resize-then-crop at a fraction of the work for images that are not square."""
    width, height = image.size
    scale = resolution / min(width, height)
    resized = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if rng is not None:
        top, left = int(rng.integers(0, resized[1] - resolution + 1)), int(rng.integers(0, resized[0] - resolution + 1))
    else:
        top, left = (resized[1] - resolution) // 2, (resized[0] - resolution) // 2
    if resized == image.size:
        return image.crop((left, top, left + resolution, top + resolution)), (top, left)
    x_scale, y_scale = width / resized[0], height / resized[1]
    box = (left * x_scale, top * y_scale, (left + resolution) * x_scale, (top + resolution) * y_scale)
    # reducing_gap: a fast box reduction to ~3x the target first, then bicubic (PIL's own trick).
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0), (top, left)


def to_tensor(image: Image.Image, flip: bool = False) -> torch.Tensor:
    """RGB image -> (3, H, W) float in [-1, 1], mirrored left-right when ``flip``."""
    pixels = np.array(image, dtype=np.uint8)
    if flip:
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    return torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)
