"""Reading a built-in scene's facts (shape, colour, background) back from its pixels, by pixel statistics
alone: no learned model, so prompt adherence is measured the same way on any machine.

The facts and their names are the built-in data set's (``ldm.data.synthetic``); the learned classifier
that gives FID features is ``ldm.evaluation.scene_classifier``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ldm.data.synthetic import BACKGROUNDS, COLOURS, positions_for

def _as_rgb_array(
    image: np.ndarray | Image.Image | torch.Tensor, value_range: tuple[float, float] | None
) -> np.ndarray:
    """(H, W, 3) float64 in [0, 255] from a PIL image, an (H, W, 3) array or a (3, H, W) tensor
    (value ranges as described in ``classify_scene``)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
        floating = image.is_floating_point()
        array = image.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()
    else:
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) image array, got shape {array.shape}")
        floating = np.issubdtype(array.dtype, np.floating)
        array = array.astype(np.float64)
    if value_range is None:
        value_range = ((-1.0 if array.min() < _SIGNED_RANGE_BELOW else 0.0), 1.0) if floating else (0.0, 255.0)
    low, high = value_range
    return np.clip((array - low) * (255.0 / (high - low)), 0.0, 255.0)


def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float64) - value, axis=-1)
    return names[int(np.argmin(distances))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (label propagation; fine for small images)."""
    height, width = mask.shape
    big = height * width
    labels = np.where(mask, np.arange(big).reshape(height, width), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([
            labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:],
        ])
        updated = np.where(mask, neighbours, big)
        if np.array_equal(updated, labels):
            break
        labels = updated
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[np.argmax(counts)]


# Pixels this far (RGB distance) from the background are shape candidates: under half the smallest
# background-to-colour distance (gray to red, ~221), far above noise of std 0.05 (~22 in 0..255 units).
_CANDIDATE_DISTANCE = 80.0
# Shape features, measured on the shape's coverage ("alpha") so they hold at a few pixels' size:
# fill = area / (width * height): square 1, circle pi/4 ~ 0.785 (seen: <= 0.85 with blur and noise,
# square >= 0.95); vertical skewness of the area: upright triangle -2*sqrt(2)/5 ~ -0.57, the others 0.
_SQUARE_MIN_FILL = 0.9
# The cross (ldm.data.synthetic.NEW_SHAPES) fills 5/9 ~ 0.56 of its box, the circle pi/4 ~ 0.785: split between.
_CROSS_MAX_FILL = 0.67
_TRIANGLE_MAX_SKEW = -0.25
# Float tensors below this are taken to be in [-1, 1]: a scene in [-1, 1] always holds a channel near -1.
_SIGNED_RANGE_BELOW = -0.25


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = np.logical_or.reduce([
            padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx]
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)
        ])
    return mask


def _shape_from_coverage(coverage: np.ndarray) -> str:
    """Circle, square, triangle or cross from a (H, W) map of shape coverage in [0, 1] (zero off the shape)."""
    area = coverage.sum()
    # The mean of the 3 longest rows/columns: robust to noise on one line.
    width = np.sort(coverage.sum(axis=1))[-3:].mean()
    height = np.sort(coverage.sum(axis=0))[-3:].mean()
    fill = area / max(width * height, 1e-6)
    row_mass = coverage.sum(axis=1) / area
    y = np.arange(coverage.shape[0], dtype=np.float64)
    mean = (row_mass * y).sum()
    variance = (row_mass * (y - mean) ** 2).sum()
    skewness = (row_mass * (y - mean) ** 3).sum() / max(variance, 1e-6) ** 1.5
    if skewness < _TRIANGLE_MAX_SKEW:
        return "triangle"
    if fill < _CROSS_MAX_FILL:
        return "cross"
    return "square" if fill >= _SQUARE_MIN_FILL else "circle"


def _position_from_coverage(coverage: np.ndarray) -> str | None:
    """The half of a non-square image (H, W) that holds the coverage's centroid: left/right when wide,
    top/bottom when tall; None when square."""
    height, width = coverage.shape
    positions = positions_for(height, width)
    if not positions:
        return None
    axis_length, profile = (width, coverage.sum(axis=0)) if width > height else (height, coverage.sum(axis=1))
    centroid = (profile * (np.arange(axis_length) + 0.5)).sum() / max(profile.sum(), 1e-6)
    return positions[0] if centroid < axis_length / 2 else positions[1]


def classify_scene(
    image: np.ndarray | Image.Image | torch.Tensor, value_range: tuple[float, float] | None = None
) -> dict[str, str]:
    """Read a scene's facts from its pixels: ``{"shape", "colour", "background"}`` (names as in the captions;
    any height and width), and ``"position"`` on a non-square image.

    ``image``: PIL image; (H, W, 3) array (uint8 in [0, 255], float in [0, 1]); or (3, H, W) tensor
    (uint8; float in [0, 1], or in [-1, 1] when it holds values below -0.25, as the data pipeline's
    images do). ``value_range=(low, high)`` overrides the guess for float input.
    Pixel statistics only, no learned model: background = the background colour that most border
    pixels are nearest to; shape pixels = those at least half way from the background colour to the
    shape's colour (largest connected region); colour = nearest palette colour to the median of the
    shape's core; shape = from its coverage map: vertical skewness (triangle) and area over width x
    height (square ~1, circle ~pi/4, cross 5/9); position = the half of a wide (left, right) or tall (top,
    bottom) image that holds the shape's centroid. Shape, colour and position are ``"none"`` when no shape
    is found.
    """
    pixels = _as_rgb_array(image, value_range)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])

    palette = {**BACKGROUNDS, **COLOURS}
    palette_values = np.asarray(list(palette.values()), dtype=np.float64)
    nearest = np.argmin(np.linalg.norm(border[:, None, :] - palette_values[None], axis=-1), axis=1)
    votes = np.bincount(nearest, minlength=len(palette))[: len(BACKGROUNDS)]
    if votes.max() > 0:
        winner = int(np.argmax(votes))
        background = list(BACKGROUNDS)[winner]
        background_value = np.median(border[nearest == winner], axis=0)
    else:  # no border pixel looks like any background: take the nearest to their median
        background_value = np.median(border, axis=0)
        background = _nearest(background_value, BACKGROUNDS)

    none = {"shape": "none", "colour": "none", "background": background}
    if positions_for(height, width):
        none["position"] = "none"
    distance = np.linalg.norm(pixels - background_value, axis=-1)
    candidates = distance > _CANDIDATE_DISTANCE
    min_pixels = max(4, int(0.002 * height * width))
    if candidates.sum() < min_pixels:
        return none
    core = candidates & (distance >= 0.8 * np.percentile(distance[candidates], 95))
    shape_value = np.median(pixels[core], axis=0)
    colour = _nearest(shape_value, COLOURS)

    direction = shape_value - background_value
    alpha = (pixels - background_value) @ direction / max(float(direction @ direction), 1e-6)
    inside = alpha >= 0.5
    if inside.sum() < min_pixels:
        return {**none, "colour": colour}
    region = _dilate(_largest_component(inside), steps=2)  # the shape and its anti-aliased or blurred rim
    coverage = np.where(region, np.clip(alpha, 0.0, 1.0), 0.0)
    facts = {"shape": _shape_from_coverage(coverage), "colour": colour, "background": background}
    position = _position_from_coverage(coverage)
    return facts | ({"position": position} if position is not None else {})
