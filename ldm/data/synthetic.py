"""The built-in captioned data set: one filled shape on a plain background, written as WebDataset shards.

Each scene has three facts that its caption states exactly ("a red circle on a white background"):
the shape, its colour and the background. Size and position vary but are not captioned. Because the
facts can be read back from the pixels (``ldm.evaluation.pixel_scene_classifier``), the set measures
whether a generated image follows its prompt without any learned model.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.atomic import atomic_write

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
    if shape not in ALL_SHAPES or colour not in COLOURS or background not in BACKGROUNDS:
        raise ValueError(
            f"caption {caption!r} names an unknown fact; shapes: {ALL_SHAPES}, colours: {tuple(COLOURS)}, "
            f"backgrounds: {tuple(BACKGROUNDS)}"
        )
    return {"shape": shape, "colour": colour, "background": background}


def _check_facts(shape: str, colour: str, background: str) -> None:
    if shape not in ALL_SHAPES:
        raise ValueError(f"shape={shape!r} is unknown; choose one of {ALL_SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"colour={colour!r} is unknown; choose one of {tuple(COLOURS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background={background!r} is unknown; choose one of {tuple(BACKGROUNDS)}")


def shape_coverage(shape: str, size: float, centre: tuple[float, float], resolution: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (resolution, resolution) float32 in [0, 1].

    ``size``: span (width and height) as a fraction of the image side; ``centre``: (x, y) as fractions
    of the image side, origin at the top left. The triangle is upright and isosceles (base = height = span);
    the cross is an upright plus sign whose arms are a third of the span thick.
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
    elif shape == "cross":
        arm = half * CROSS_ARM_WIDTH
        square = (np.abs(x) <= half) & (np.abs(y) <= half)
        inside = square & ((np.abs(x) <= arm) | (np.abs(y) <= arm))
    else:
        raise ValueError(f"shape={shape!r} is unknown; choose one of {ALL_SHAPES}")
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
    shapes: tuple[str, ...] = SHAPES,
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
    for shape in shapes:
        _check_facts(shape, "red", "white")
    facts = sample_scene_facts(num_samples, seed, split, tuple(shapes))
    paths = []
    for shard_index in range(math.ceil(num_samples / samples_per_shard)):
        path = out_dir / f"{split}-{shard_index:06d}.tar"
        with atomic_write(path) as partial, tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
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
) -> tuple[str, str]:
    """Make sure the built-in set exists under ``data_dir/synthetic-{resolution}px-{seed}/`` (``-{shapes}`` added
    when ``shapes`` are not the default three, e.g. ``("cross",)`` for a fine-tuning set); returns
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
            write_synthetic_shards(staging, num_train, samples_per_shard, resolution, seed, split="train", shapes=chosen)
            write_synthetic_shards(staging, num_val, samples_per_shard, resolution, seed, split="val", shapes=chosen)
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
    shapes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
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
