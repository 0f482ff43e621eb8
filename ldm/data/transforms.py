"""Image decoding and geometry for the shard pipeline: draft-mode JPEG decoding, resize, crop, flip."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def open_image(data: bytes) -> Image.Image:
    """Open image bytes lazily: only the header is read, so ``.size`` is known before any decoding."""
    return Image.open(io.BytesIO(data))


def decode_rgb(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Decode an opened image to RGB. JPEGs are decoded at the largest power-of-two reduction (1/2,
    1/4, 1/8; PIL's draft mode, done inside libjpeg) that still covers ``size`` ((height, width), or
    one side of a square), which is several times faster for images much larger than the training size."""
    height, width = (size, size) if isinstance(size, int) else size
    image.draft("RGB", (width, height))  # PIL keeps both sides >= these, i.e. the image still covers the crop
    image.load()
    return image if image.mode == "RGB" else to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of an image; transparent pixels are put on white, as a browser shows them."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# Above this many times the training size, an image is first box-reduced by an integer factor (cheap),
# so that the bicubic filter that follows spans few source pixels (the same trick as PIL's reducing_gap).
REDUCING_GAP = 3


def resize_and_crop(
    image: Image.Image, size: int | tuple[int, int], rng: np.random.Generator | None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to cover ``size`` ((height, width), or one side of a square; bicubic, antialiased) and
    crop that size: at random when ``rng`` is given, else centred. Returns the crop, a (3, height,
    width) uint8 tensor, and its (top, left) in the resized image.

    The resampling runs in torch's uint8 antialiased kernel (vectorised; about 3x faster than PIL's
    here, with PIL's filter, so the pixels agree with PIL's resize to within a level or two)."""
    crop_height, crop_width = (size, size) if isinstance(size, int) else size
    width, height = image.size
    scale = max(crop_width / width, crop_height / height)
    resized = (max(crop_width, round(width * scale)), max(crop_height, round(height * scale)))
    if rng is not None:
        top = int(rng.integers(0, resized[1] - crop_height + 1))
        left = int(rng.integers(0, resized[0] - crop_width + 1))
    else:
        top, left = (resized[1] - crop_height) // 2, (resized[0] - crop_width) // 2
    reduce_by = int(1 / (scale * REDUCING_GAP))
    if reduce_by > 1:
        image = image.reduce(reduce_by)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W), channels-last in memory
    if resized != image.size:
        pixels = torch.nn.functional.interpolate(
            pixels[None], size=(resized[1], resized[0]), mode="bicubic", antialias=True, align_corners=False
        )[0]
    return pixels[:, top : top + crop_height, left : left + crop_width], (top, left)


def to_tensor(pixels: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """(3, H, W) uint8 image -> (3, H, W) float in [-1, 1], mirrored left-right when ``flip``."""
    if flip:
        pixels = pixels.flip(-1)
    return pixels.to(torch.float32).div_(127.5).sub_(1.0)
