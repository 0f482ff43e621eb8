"""The built-in captioned data set: one filled shape on a plain background, written as WebDataset shards.

Each scene has three facts that its caption states exactly ("a red circle on a white background"):
the shape, its colour and the background. Size and position vary but are not captioned. Because the
facts can be read back from the pixels (``classify_scene``), the set measures whether a generated
image follows its prompt without any learned model.

Shards use the img2dataset layout: per sample ``KEY.png``, ``KEY.txt`` (caption) and ``KEY.json``
(metadata), KEY = 9 digits (shard index * samples per shard + index in shard).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import tarfile
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}

MIN_SIZE, MAX_SIZE = 0.40, 0.75  # shape span as a fraction of the image side
SUPERSAMPLING = 4  # drawn at 4x and box-filtered down, so edges are anti-aliased
MIN_RESOLUTION = 8
MARKER_NAME = "COMPLETE.json"  # written last: its presence means the set is whole
FORMAT_VERSION = 1  # bump when the generator's output changes, so old sets are regenerated

_CAPTION_PATTERN = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")


def caption_for(shape: str, colour: str, background: str) -> str:
    """The caption of a scene, e.g. ``"a red circle on a white background"``."""
    _check_facts(shape, colour, background)
    return f"a {colour} {shape} on a {background} background"


def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of ``caption_for``: ``{"shape", "colour", "background"}``; ValueError if not a scene caption."""
    match = _CAPTION_PATTERN.match(caption.strip().lower())
    if match is None:
        raise ValueError(f"caption {caption!r} is not of the form 'a <colour> <shape> on a <background> background'")
    colour, shape, background = match.groups()
    if shape not in SHAPES or colour not in COLOURS or background not in BACKGROUNDS:
        raise ValueError(
            f"caption {caption!r} names an unknown fact; shapes: {SHAPES}, colours: {tuple(COLOURS)}, "
            f"backgrounds: {tuple(BACKGROUNDS)}"
        )
    return {"shape": shape, "colour": colour, "background": background}


def _check_facts(shape: str, colour: str, background: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is unknown; choose one of {SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"colour={colour!r} is unknown; choose one of {tuple(COLOURS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background={background!r} is unknown; choose one of {tuple(BACKGROUNDS)}")


def shape_coverage(shape: str, size: float, centre: tuple[float, float], resolution: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (resolution, resolution) float32 in [0, 1].

    ``size``: span (width and height) as a fraction of the image side; ``centre``: (x, y) as fractions
    of the image side, origin at the top left. The triangle is upright and isosceles (base = height = span).
    """
    high = resolution * SUPERSAMPLING
    coords = (np.arange(high, dtype=np.float64) + 0.5) / high  # sub-pixel centres, in fractions of the side
    x = coords[None, :] - centre[0]
    y = coords[:, None] - centre[1]
    half = size / 2
    if shape == "circle":
        inside = x**2 + y**2 <= half**2
    elif shape == "square":
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "triangle":
        depth_below_apex = y + half  # 0 at the apex, size at the base
        inside = (depth_below_apex >= 0) & (y <= half) & (np.abs(x) <= depth_below_apex / 2)
    else:
        raise ValueError(f"shape={shape!r} is unknown; choose one of {SHAPES}")
    blocks = inside.reshape(resolution, SUPERSAMPLING, resolution, SUPERSAMPLING)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def render_scene(
    shape: str,
    colour: str,
    background: str,
    size: float,
    centre: tuple[float, float],
    resolution: int = 32,
) -> Image.Image:
    """Draw one filled ``colour`` ``shape`` on a plain ``background``: an RGB image of resolution x resolution.

    ``size``: shape span as a fraction of the side; ``centre``: (x, y) in fractions of the side.
    Anti-aliased by drawing at 4x and averaging 4x4 blocks (a box filter).
    """
    _check_facts(shape, colour, background)
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution={resolution} is too small to draw a recognisable shape; use >= {MIN_RESOLUTION}")
    coverage = shape_coverage(shape, size, centre, resolution)[..., None]
    foreground = np.asarray(COLOURS[colour], dtype=np.float32)
    backdrop = np.asarray(BACKGROUNDS[background], dtype=np.float32)
    pixels = backdrop * (1 - coverage) + foreground * coverage
    return Image.fromarray(np.round(pixels).astype(np.uint8), mode="RGB")


def sample_scene_facts(num_samples: int, seed: int, split: str) -> list[dict]:
    """Facts of ``num_samples`` scenes: each block of 54 consecutive scenes holds every
    (shape, colour, background) combination once, in a random order; size and centre are uniform."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    combinations = [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS]
    facts = []
    while len(facts) < num_samples:
        for index in rng.permutation(len(combinations)):
            if len(facts) == num_samples:
                break
            shape, colour, background = combinations[index]
            size = round(float(rng.uniform(MIN_SIZE, MAX_SIZE)), 4)
            low, high = size / 2, 1 - size / 2  # keeps the whole shape inside the image
            centre = [round(float(rng.uniform(low, high)), 4), round(float(rng.uniform(low, high)), 4)]
            facts.append(dict(shape=shape, colour=colour, background=background, size=size, centre=centre))
    return facts


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed mtime/owner, so the same seed gives byte-identical shards
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_synthetic_shards(
    out_dir: str | Path,
    num_samples: int = 4096,
    samples_per_shard: int = 256,
    resolution: int = 32,
    seed: int = 0,
    split: str = "train",
) -> list[Path]:
    """Write ``num_samples`` scenes to ``out_dir/{split}-000000.tar, ...``; returns the shard paths.

    Deterministic: the same arguments give byte-identical shards. Each shard is written under a
    temporary name and renamed when complete.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples={num_samples} must be positive")
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be positive")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution={resolution} is too small to draw a recognisable shape; use >= {MIN_RESOLUTION}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = sample_scene_facts(num_samples, seed, split)
    paths = []
    for shard_index in range(math.ceil(num_samples / samples_per_shard)):
        path = out_dir / f"{split}-{shard_index:06d}.tar"
        partial = path.with_name(path.name + f".tmp-{os.getpid()}")
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            first = shard_index * samples_per_shard
            for index in range(first, min(first + samples_per_shard, num_samples)):
                scene = facts[index]
                key = f"{index:09d}"
                caption = caption_for(scene["shape"], scene["colour"], scene["background"])
                image = render_scene(resolution=resolution, **scene)
                metadata = dict(
                    key=key, caption=caption, status="success", width=resolution, height=resolution,
                    original_width=resolution, original_height=resolution, **scene,
                )
                _add_file(tar, f"{key}.png", _png_bytes(image))
                _add_file(tar, f"{key}.txt", caption.encode())
                _add_file(tar, f"{key}.json", json.dumps(metadata, sort_keys=True).encode())
        os.replace(partial, path)
        paths.append(path)
    return paths


def _shard_spec(directory: Path, split: str, num_shards: int) -> str:
    return str(directory / f"{split}-{{000000..{num_shards - 1:06d}}}.tar")


def ensure_synthetic_dataset(
    data_dir: str | Path,
    num_train: int = 4096,
    num_val: int = 256,
    samples_per_shard: int = 256,
    resolution: int = 32,
    seed: int = 0,
) -> tuple[str, str]:
    """Make sure the built-in set exists under ``data_dir/synthetic-{resolution}px-{seed}/``; returns
    brace-expanded shard specs ``(train, val)``, e.g. ``".../train-{000000..000015}.tar"``.

    Generated on first use into a temporary folder whose marker file (the parameters) is written
    last, then renamed into place, so a crash never leaves a half set that looks whole. An existing
    set with the same parameters is reused; one with other parameters is replaced.
    """
    if num_train <= 0 or num_val <= 0:
        raise ValueError(f"num_train={num_train} and num_val={num_val} must both be positive")
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be positive")
    parameters = dict(
        format_version=FORMAT_VERSION, num_train=num_train, num_val=num_val,
        samples_per_shard=samples_per_shard, resolution=resolution, seed=seed,
    )
    directory = Path(data_dir) / f"synthetic-{resolution}px-{seed}"
    specs = (
        _shard_spec(directory, "train", math.ceil(num_train / samples_per_shard)),
        _shard_spec(directory, "val", math.ceil(num_val / samples_per_shard)),
    )
    if _read_marker(directory) == parameters:
        return specs

    started = time.perf_counter()
    staging = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_synthetic_shards(staging, num_train, samples_per_shard, resolution, seed, split="train")
        write_synthetic_shards(staging, num_val, samples_per_shard, resolution, seed, split="val")
        (staging / MARKER_NAME).write_text(json.dumps(parameters, sort_keys=True))
        if directory.exists():
            if _read_marker(directory) == parameters:  # another process finished first
                return specs
            logger.warning("Replacing %s: an incomplete set, or one made with other parameters than %s",
                           directory, parameters)
            shutil.rmtree(directory)
        try:
            os.rename(staging, directory)
        except OSError:
            if _read_marker(directory) != parameters:  # lost a race to a set with other parameters
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "Generated the synthetic set (%d train + %d val images, %d px) in %s in %.1f s",
        num_train, num_val, resolution, directory, time.perf_counter() - started,
    )
    return specs


@dataclass(frozen=True)
class SyntheticSet:
    """The built-in set's parameters (``data.synthetic``): the arguments of ``ensure_synthetic_dataset``,
    range-checked when built so a bad value stops the run before any shard is written."""

    data_dir: str
    num_train: int = 4096
    num_val: int = 256
    samples_per_shard: int = 256
    resolution: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not str(self.data_dir).strip():
            raise ValueError("data.synthetic.data_dir is empty: give the folder to write the set into")
        for name in ("num_train", "num_val", "samples_per_shard"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.synthetic.{name}={getattr(self, name)} must be > 0")
        if self.resolution < MIN_RESOLUTION:
            raise ValueError(f"data.synthetic.resolution={self.resolution} is too small to draw a recognisable "
                             f"shape; use >= {MIN_RESOLUTION}")

    def ensure(self) -> tuple[str, str]:
        """``ensure_synthetic_dataset`` with these parameters: the (train, val) shard specs."""
        return ensure_synthetic_dataset(**asdict(self))


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


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
    """Circle, square or triangle from a (H, W) map of shape coverage in [0, 1] (zero off the shape)."""
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
    return "square" if fill >= _SQUARE_MIN_FILL else "circle"


def classify_scene(
    image: np.ndarray | Image.Image | torch.Tensor, value_range: tuple[float, float] | None = None
) -> dict[str, str]:
    """Read a scene's facts from its pixels: ``{"shape", "colour", "background"}`` (names as in the captions).

    ``image``: PIL image; (H, W, 3) array (uint8 in [0, 255], float in [0, 1]); or (3, H, W) tensor
    (uint8; float in [0, 1], or in [-1, 1] when it holds values below -0.25, as the data pipeline's
    images do). ``value_range=(low, high)`` overrides the guess for float input.
    Pixel statistics only, no learned model: background = the background colour that most border
    pixels are nearest to; shape pixels = those at least half way from the background colour to the
    shape's colour (largest connected region); colour = nearest palette colour to the median of the
    shape's core; shape = from its coverage map: vertical skewness (triangle) and area over width x
    height (square ~1, circle ~pi/4). Shape and colour are ``"none"`` when no shape is found.
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
    return {"shape": _shape_from_coverage(coverage), "colour": colour, "background": background}
