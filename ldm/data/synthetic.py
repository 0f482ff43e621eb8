"""The built-in captioned data set: one filled shape on a plain background, written as WebDataset shards.

Each scene has three facts that its caption states exactly ("a red circle on a white background"):
the shape, its colour and the background. Size and position vary but are not captioned. Because the
facts can be read back from the pixels (``ldm.evaluation.pixel_scene_classifier``), the set measures
whether a generated image follows its prompt without any learned model.

The multi-aspect variant (``sizes``: several (height, width) image sizes, e.g. 32x32, 32x64 and 64x32)
draws each scene at one of the sizes; on a wide image the shape lies wholly in the left or right half, on a
tall one in the top or bottom half, and the caption says which ("a red circle on the left of a white
background"), so a crop that cuts the scene shows in the prompt-adherence numbers. Square images keep the
square set's caption.

Shards use the img2dataset layout: per sample ``KEY.png``, ``KEY.txt`` (caption) and ``KEY.json``
(metadata), KEY = 9 digits (shard index * samples per shard + index in shard).
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import shutil
import tarfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.atomic import atomic_write
from ldm.data.tars import SHARD_MTIME

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Shapes the default set never draws: a concept to teach a trained model afterwards (LoRA, DreamBooth).
NEW_SHAPES: tuple[str, ...] = ("cross",)
ALL_SHAPES: tuple[str, ...] = SHAPES + NEW_SHAPES
CROSS_ARM_WIDTH = 1 / 3  # arm thickness as a fraction of the span: area 5/9 of the bounding square
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

# Where the shape lies on a non-square image: a half along its long side.
WIDE_POSITIONS: tuple[str, ...] = ("left", "right")
TALL_POSITIONS: tuple[str, ...] = ("top", "bottom")
POSITIONS: tuple[str, ...] = WIDE_POSITIONS + TALL_POSITIONS

_CAPTION_PATTERN = re.compile(r"^an? (\w+) (\w+) (?:on the (\w+) of|on) an? (\w+) background$")


def caption_for(shape: str, colour: str, background: str, position: str | None = None) -> str:
    """The caption of a scene, e.g. ``"a red circle on a white background"``, or with a ``position``
    (multi-aspect set) ``"a red circle on the left of a white background"``."""
    _check_facts(shape, colour, background)
    if position is None:
        return f"a {colour} {shape} on a {background} background"
    if position not in POSITIONS:
        raise ValueError(f"position={position!r} is unknown; choose one of {POSITIONS}")
    return f"a {colour} {shape} on the {position} of a {background} background"


def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of ``caption_for``: ``{"shape", "colour", "background"}``, plus ``"position"`` where the
    caption states one; ValueError if not a scene caption."""
    match = _CAPTION_PATTERN.match(caption.strip().lower())
    if match is None:
        raise ValueError(f"caption {caption!r} is not of the form 'a <colour> <shape> on [the <position> of] "
                         f"a <background> background'")
    colour, shape, position, background = match.groups()
    if shape not in ALL_SHAPES or colour not in COLOURS or background not in BACKGROUNDS:
        raise ValueError(
            f"caption {caption!r} names an unknown fact; shapes: {ALL_SHAPES}, colours: {tuple(COLOURS)}, "
            f"backgrounds: {tuple(BACKGROUNDS)}"
        )
    if position is not None and position not in POSITIONS:
        raise ValueError(f"caption {caption!r} names an unknown position; choose one of {POSITIONS}")
    facts = {"shape": shape, "colour": colour, "background": background}
    return facts | ({"position": position} if position is not None else {})


def positions_for(height: int, width: int) -> tuple[str, ...]:
    """The positions a caption may state on a height x width image: left/right when wide, top/bottom when
    tall, none when square."""
    if width > height:
        return WIDE_POSITIONS
    if height > width:
        return TALL_POSITIONS
    return ()


def _check_facts(shape: str, colour: str, background: str) -> None:
    if shape not in ALL_SHAPES:
        raise ValueError(f"shape={shape!r} is unknown; choose one of {ALL_SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"colour={colour!r} is unknown; choose one of {tuple(COLOURS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background={background!r} is unknown; choose one of {tuple(BACKGROUNDS)}")


def image_size(resolution: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of ``resolution``: one side for a square image, or a (height, width) pair."""
    if isinstance(resolution, (int, np.integer)):
        return int(resolution), int(resolution)
    height, width = (int(side) for side in resolution)
    return height, width


def shape_coverage(shape: str, size: float, centre: tuple[float, float], resolution: int | Sequence[int]
                   ) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (height, width) float32 in [0, 1].

    ``resolution``: the side of a square image, or (height, width). ``size``: span (width and height) as a
    fraction of the image's short side; ``centre``: (x, y) in the same unit (fractions of the short side),
    origin at the top left. The triangle is upright and isosceles (base = height = span); the cross is an
    upright plus sign whose arms are a third of the span thick.
    """
    height, width = image_size(resolution)
    unit = min(height, width) * SUPERSAMPLING  # sub-pixels per short side
    x = (np.arange(width * SUPERSAMPLING, dtype=np.float64) + 0.5)[None, :] / unit - centre[0]
    y = (np.arange(height * SUPERSAMPLING, dtype=np.float64) + 0.5)[:, None] / unit - centre[1]
    half = size / 2
    if shape == "circle":
        inside = x**2 + y**2 <= half**2
    elif shape == "square":
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "triangle":
        depth_below_apex = y + half  # 0 at the apex, size at the base
        inside = (depth_below_apex >= 0) & (y <= half) & (np.abs(x) <= depth_below_apex / 2)
    elif shape == "cross":
        arm = half * CROSS_ARM_WIDTH
        square = (np.abs(x) <= half) & (np.abs(y) <= half)
        inside = square & ((np.abs(x) <= arm) | (np.abs(y) <= arm))
    else:
        raise ValueError(f"shape={shape!r} is unknown; choose one of {ALL_SHAPES}")
    blocks = inside.reshape(height, SUPERSAMPLING, width, SUPERSAMPLING)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def render_scene(
    shape: str,
    colour: str,
    background: str,
    size: float,
    centre: tuple[float, float],
    resolution: int | Sequence[int] = 32,
) -> Image.Image:
    """Draw one filled ``colour`` ``shape`` on a plain ``background``: an RGB image of resolution x resolution
    (or of (height, width) when ``resolution`` is a pair).

    ``size``: shape span as a fraction of the short side; ``centre``: (x, y) in fractions of the short side.
    Anti-aliased by drawing at 4x and averaging 4x4 blocks (a box filter).
    """
    _check_facts(shape, colour, background)
    if min(image_size(resolution)) < MIN_RESOLUTION:
        raise ValueError(f"resolution={resolution} is too small to draw a recognisable shape; use >= {MIN_RESOLUTION}")
    coverage = shape_coverage(shape, size, centre, resolution)[..., None]
    foreground = np.asarray(COLOURS[colour], dtype=np.float32)
    backdrop = np.asarray(BACKGROUNDS[background], dtype=np.float32)
    pixels = backdrop * (1 - coverage) + foreground * coverage
    return Image.fromarray(np.round(pixels).astype(np.uint8), mode="RGB")


def sample_scene_facts(num_samples: int, seed: int, split: str, shapes: tuple[str, ...] = SHAPES) -> list[dict]:
    """Facts of ``num_samples`` scenes: each block of consecutive scenes (54 for the three default ``shapes``)
    holds every (shape, colour, background) combination once, in a random order; size and centre are uniform."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    combinations = [(s, c, b) for s in shapes for c in COLOURS for b in BACKGROUNDS]
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


def _uniform_centre(rng: np.random.Generator, size: float, long_side: float, position: str | None
                    ) -> tuple[float, float]:
    """A centre (along the long side, along the short side) that keeps a shape of span ``size`` wholly inside
    the image (``long_side`` in units of the short side) and, for a ``position``, inside its half."""
    low, high = size / 2, long_side - size / 2
    if position in ("left", "top"):
        high = long_side / 2 - size / 2
    elif position in ("right", "bottom"):
        low = long_side / 2 + size / 2
    along = round(float(rng.uniform(low, high)), 4)
    across = round(float(rng.uniform(size / 2, 1 - size / 2)), 4)
    return along, across


def check_sizes(sizes: Sequence[Sequence[int]], key: str = "sizes") -> tuple[tuple[int, int], ...]:
    """``sizes`` as (height, width) pairs; ValueError naming ``key`` for a side below ``MIN_RESOLUTION``, or an
    aspect ratio whose halves cannot hold the largest shape (a non-square side ratio below 2 * MAX_SIZE)."""
    pairs = []
    for pair in sizes:
        if len(pair) != 2:
            raise ValueError(f"{key}={[list(p) for p in sizes]}: each size is a [height, width] pair")
        height, width = int(pair[0]), int(pair[1])
        if min(height, width) < MIN_RESOLUTION:
            raise ValueError(f"{key}: {height}x{width} is too small to draw a recognisable shape; "
                             f"use sides >= {MIN_RESOLUTION}")
        ratio = max(height, width) / min(height, width)
        if ratio != 1 and ratio < 2 * MAX_SIZE:
            raise ValueError(f"{key}: {height}x{width} (aspect {ratio:.2f}) is too close to square for a shape of up "
                             f"to {MAX_SIZE} of the short side to fit in one half; use a ratio of 1 or >= {2 * MAX_SIZE}")
        pairs.append((height, width))
    if not pairs or len(set(pairs)) != len(pairs):
        raise ValueError(f"{key}={[list(p) for p in sizes]} must list distinct [height, width] pairs")
    return tuple(pairs)


def sample_multi_aspect_facts(num_samples: int, seed: int, sizes: Sequence[Sequence[int]], split: str,
                              shapes: tuple[str, ...] = SHAPES) -> list[dict]:
    """Facts of ``num_samples`` scenes of the multi-aspect set: each block of consecutive scenes holds every
    (shape, colour, background, image size) combination once, in a random order; on a non-square size the
    half the shape lies in (``position``) is drawn uniformly, size and centre uniformly within it.

    Each scene: ``shape, colour, background, size, centre`` (as ``render_scene`` takes them), ``height``,
    ``width`` and ``position`` (None on a square image)."""
    sizes = check_sizes(sizes)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), zlib.crc32(b"multi-aspect")])
    combinations = [(s, c, b, hw) for s in shapes for c in COLOURS for b in BACKGROUNDS for hw in sizes]
    facts = []
    while len(facts) < num_samples:
        for index in rng.permutation(len(combinations)):
            if len(facts) == num_samples:
                break
            shape, colour, background, (height, width) = combinations[index]
            positions = positions_for(height, width)
            position = positions[int(rng.integers(len(positions)))] if positions else None
            size = round(float(rng.uniform(MIN_SIZE, MAX_SIZE)), 4)
            along, across = _uniform_centre(rng, size, max(height, width) / min(height, width), position)
            centre = [along, across] if width >= height else [across, along]
            facts.append(dict(shape=shape, colour=colour, background=background, size=size, centre=centre,
                              height=height, width=width, position=position))
    return facts


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed mtime/owner, so the same seed gives byte-identical shards
    info.size = len(data)
    info.mode = 0o644
    info.mtime = SHARD_MTIME
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
    shapes: tuple[str, ...] = SHAPES,
    sizes: Sequence[Sequence[int]] | None = None,
) -> list[Path]:
    """Write ``num_samples`` scenes to ``out_dir/{split}-000000.tar, ...``; returns the shard paths.

    ``sizes``: None for square ``resolution`` images; or (height, width) pairs for the multi-aspect set
    (``sample_multi_aspect_facts``; ``resolution`` is then unused). Deterministic: the same arguments give
    byte-identical shards. Each shard is written under a temporary name and renamed when complete.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples={num_samples} must be positive")
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be positive")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution={resolution} is too small to draw a recognisable shape; use >= {MIN_RESOLUTION}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        _check_facts(shape, "red", "white")
    if sizes is None:
        facts = [dict(scene, height=resolution, width=resolution, position=None)
                 for scene in sample_scene_facts(num_samples, seed, split, tuple(shapes))]
    else:
        facts = sample_multi_aspect_facts(num_samples, seed, sizes, split, tuple(shapes))
    paths = []
    for shard_index in range(math.ceil(num_samples / samples_per_shard)):
        path = out_dir / f"{split}-{shard_index:06d}.tar"
        with atomic_write(path) as partial, tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            first = shard_index * samples_per_shard
            for index in range(first, min(first + samples_per_shard, num_samples)):
                scene = dict(facts[index])
                key = f"{index:09d}"
                height, width, position = scene.pop("height"), scene.pop("width"), scene.pop("position")
                caption = caption_for(scene["shape"], scene["colour"], scene["background"], position)
                image = render_scene(resolution=(height, width), **scene)
                if position is not None:  # the square set's metadata stays as it was
                    scene["position"] = position
                metadata = dict(
                    key=key, caption=caption, status="success", width=width, height=height,
                    original_width=width, original_height=height, **scene,
                )
                _add_file(tar, f"{key}.png", _png_bytes(image))
                _add_file(tar, f"{key}.txt", caption.encode())
                _add_file(tar, f"{key}.json", json.dumps(metadata, sort_keys=True).encode())
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
    shapes: tuple[str, ...] | None = None,
    sizes: Sequence[Sequence[int]] | None = None,
) -> tuple[str, str]:
    """Make sure the built-in set exists under ``data_dir/synthetic-{resolution}px-{seed}/`` (``-{shapes}`` added
    when ``shapes`` are not the default three, e.g. ``("cross",)`` for a fine-tuning set; the multi-aspect set,
    with ``sizes``, under ``data_dir/synthetic-{H}x{W}-...-{seed}/``); returns brace-expanded shard specs
    ``(train, val)``, e.g. ``".../train-{000000..000015}.tar"``.

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
    if sizes is not None:
        sizes = check_sizes(sizes, "data.synthetic.sizes")
        del parameters["resolution"]
        parameters["sizes"] = [list(pair) for pair in sizes]
        directory = Path(data_dir) / f"synthetic-{'-'.join(f'{h}x{w}' for h, w in sizes)}-{seed}"
    if shapes is not None and tuple(shapes) != SHAPES:
        parameters["shapes"] = list(shapes)
        directory = directory.with_name(f"{directory.name}-{'-'.join(shapes)}")
    specs = (
        _shard_spec(directory, "train", math.ceil(num_train / samples_per_shard)),
        _shard_spec(directory, "val", math.ceil(num_val / samples_per_shard)),
    )
    if _read_marker(directory) == parameters:
        return specs

    started = time.perf_counter()
    try:
        with atomic_write(directory) as staging:
            chosen = tuple(shapes) if shapes is not None else SHAPES
            for split, count in (("train", num_train), ("val", num_val)):
                write_synthetic_shards(staging, count, samples_per_shard, resolution, seed, split=split, shapes=chosen,
                                       sizes=sizes)
            (staging / MARKER_NAME).write_text(json.dumps(parameters, sort_keys=True))
            if directory.exists():
                if _read_marker(directory) == parameters:  # another process finished first: keep its set
                    shutil.rmtree(staging)  # (atomic_write then renames nothing)
                    return specs
                logger.warning("Replacing %s: an incomplete set, or one made with other parameters than %s",
                               directory, parameters)
                shutil.rmtree(directory)
    except OSError:
        if _read_marker(directory) != parameters:  # not a race lost to a process that wrote the same set
            raise
        return specs
    logger.info(
        "Generated the synthetic set (%d train + %d val images, %s) in %s in %.1f s", num_train, num_val,
        f"{resolution} px" if sizes is None else ", ".join(f"{h}x{w}" for h, w in sizes), directory,
        time.perf_counter() - started,
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
    shapes: tuple[str, ...] | None = None
    # The multi-aspect set: [height, width] of each image size (resolution then unused); null: square.
    sizes: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.sizes is not None:
            object.__setattr__(self, "sizes", check_sizes(self.sizes, "data.synthetic.sizes"))
        if self.shapes is not None:
            object.__setattr__(self, "shapes", tuple(self.shapes))
            unknown = [shape for shape in self.shapes if shape not in ALL_SHAPES]
            if unknown or not self.shapes:
                raise ValueError(f"data.synthetic.shapes={list(self.shapes)}: choose from {ALL_SHAPES}")
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
