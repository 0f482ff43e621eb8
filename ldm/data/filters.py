"""Metadata filters over each sample's JSON (img2dataset / LAION fields), and the choice of caption."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Field names as img2dataset and the LAION metadata write them (first match wins).
ORIGINAL_WIDTH_KEYS = ("original_width", "width")
ORIGINAL_HEIGHT_KEYS = ("original_height", "height")
AESTHETIC_KEYS = ("aesthetic", "aesthetic_score", "AESTHETIC_SCORE")
WATERMARK_KEYS = ("pwatermark", "watermark")
UNSAFE_KEYS = ("punsafe",)


def _number(metadata: dict, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = metadata.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            return float(value)
    return None


@dataclass(frozen=True)
class MetadataFilters:
    """Which samples to leave out, judged from their JSON metadata; every filter is off (None) by default.

    ``min_width``/``min_height``: the original image size (``original_width``/``original_height``,
    else ``width``/``height`` in the JSON, else the image file's header). ``min_aesthetic``: LAION
    aesthetic score. ``max_pwatermark``/``max_punsafe``: LAION watermark and NSFW probabilities.
    ``min_caption_length``/``max_caption_length``: in characters, of the chosen caption. A sample
    whose JSON lacks a scored field (aesthetic, pwatermark, punsafe) is kept: the filter cannot judge it.
    """

    min_width: int | None = None
    min_height: int | None = None
    min_aesthetic: float | None = None
    max_pwatermark: float | None = None
    max_punsafe: float | None = None
    min_caption_length: int | None = None
    max_caption_length: int | None = None

    def __post_init__(self) -> None:
        if self.min_aesthetic is not None and not np.isfinite(self.min_aesthetic):
            raise ValueError(f"data.filters.min_aesthetic={self.min_aesthetic} must be a finite score, or null")
        for name in ("max_pwatermark", "max_punsafe"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"data.filters.{name}={value} is a probability threshold: give a value in [0, 1]")
        for name in ("min_width", "min_height", "min_caption_length", "max_caption_length"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"data.filters.{name}={value} must be >= 0, or null to turn it off")
        if (self.min_caption_length is not None and self.max_caption_length is not None
                and self.min_caption_length > self.max_caption_length):
            raise ValueError(f"data.filters.min_caption_length={self.min_caption_length} exceeds "
                             f"max_caption_length={self.max_caption_length}: no caption could pass")

    def rejects_metadata(self, metadata: dict, caption: str) -> str | None:
        """The skip reason (``filtered_*``) if the JSON or the caption fail a filter, else None."""
        width, height = _number(metadata, ORIGINAL_WIDTH_KEYS), _number(metadata, ORIGINAL_HEIGHT_KEYS)
        if self.rejects_size(width, height):
            return "filtered_size"
        aesthetic = _number(metadata, AESTHETIC_KEYS)
        if self.min_aesthetic is not None and aesthetic is not None and aesthetic < self.min_aesthetic:
            return "filtered_aesthetic"
        watermark = _number(metadata, WATERMARK_KEYS)
        if self.max_pwatermark is not None and watermark is not None and watermark > self.max_pwatermark:
            return "filtered_watermark"
        unsafe = _number(metadata, UNSAFE_KEYS)
        if self.max_punsafe is not None and unsafe is not None and unsafe > self.max_punsafe:
            return "filtered_unsafe"
        length = len(caption)
        if (self.min_caption_length is not None and length < self.min_caption_length) or (
                self.max_caption_length is not None and length > self.max_caption_length):
            return "filtered_caption_length"
        return None

    def rejects_size(self, width: float | None, height: float | None) -> bool:
        """True when a known width or height is below its minimum."""
        return (self.min_width is not None and width is not None and width < self.min_width) or (
            self.min_height is not None and height is not None and height < self.min_height)

    def needs_image_size(self, metadata: dict) -> bool:
        """True when a size filter is on but the JSON does not give the size (the image header must)."""
        return (self.min_width is not None and _number(metadata, ORIGINAL_WIDTH_KEYS) is None) or (
            self.min_height is not None and _number(metadata, ORIGINAL_HEIGHT_KEYS) is None)


def caption_candidates(text: bytes | None, metadata: dict) -> list[str]:
    """The usable captions of a sample, stripped, empty ones left out.

    A list under ``"captions"`` (or a list under ``"caption"``) in the JSON gives several; else the
    ``KEY.txt`` text; else a string ``"caption"`` in the JSON.
    """
    for key in ("captions", "caption"):
        value = metadata.get(key)
        if isinstance(value, list):
            listed = [c.strip() for c in value if isinstance(c, str) and c.strip()]
            if listed:
                return listed
    if text is not None:
        caption = text.decode("utf-8", errors="replace").strip()
        if caption:
            return [caption]
    caption = metadata.get("caption")
    return [caption.strip()] if isinstance(caption, str) and caption.strip() else []


def choose_caption(candidates: list[str], rng: np.random.Generator | None) -> str:
    """One caption: a random one when ``rng`` is given (training), else the first."""
    if rng is None or len(candidates) == 1:
        return candidates[0]
    return candidates[int(rng.integers(len(candidates)))]
