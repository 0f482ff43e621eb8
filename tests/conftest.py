"""Test-wide settings: never touch the network, keep W&B offline, few threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


import io  # noqa: E402
import json  # noqa: E402
import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# (height, width) of the images of ``write_aspect_shards``: square, 2:1 wide and tall, 3:2 wide, small (upscaled).
ASPECT_SIZES = ((32, 32), (32, 64), (64, 32), (32, 48), (12, 24))


def write_aspect_shards(directory: Path, num_samples: int, samples_per_shard: int, seed: int = 0,
                        prefix: str = "train") -> list[Path]:
    """Shards of PNGs of several aspect ratios (``ASPECT_SIZES``, drawn at random) with a caption and JSON
    (width, height) each: a smooth random field, so that different crops give different pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(-(-num_samples // samples_per_shard)):
        path = directory / f"{prefix}-{shard:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(shard * samples_per_shard, min(num_samples, (shard + 1) * samples_per_shard)):
                height, width = ASPECT_SIZES[int(rng.integers(len(ASPECT_SIZES)))]
                coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                files = {"png": buffer.getvalue(), "txt": f"image {index} of {height}x{width}".encode(),
                         "json": json.dumps({"width": width, "height": height}).encode()}
                for extension, data in files.items():
                    info = tarfile.TarInfo(f"{index:09d}.{extension}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def aspect_shards(tmp_path_factory) -> list[Path]:
    """6 shards of 20 images of several aspect ratios (see ``write_aspect_shards``)."""
    return write_aspect_shards(tmp_path_factory.mktemp("aspect"), num_samples=120, samples_per_shard=20, seed=11)


@pytest.fixture(scope="session")
def aspect_shard_writer():
    """``write_aspect_shards``, for tests that need their own set."""
    return write_aspect_shards
