"""Small shard sets for the data tests, built once per session in a temporary folder."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from ldm.data.synthetic import write_synthetic_shards


def write_tar(path: Path, files: list[tuple[str, bytes]]) -> Path:
    """A plain tar with the given (name, bytes) members, in order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def image_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def keys_in(shard: Path) -> list[str]:
    """Sample keys of a tar shard, in order."""
    with tarfile.open(shard) as tar:
        return list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> list[Path]:
    """5 synthetic shards of 24, 24, 24, 24 and 4 samples (32 px)."""
    return write_synthetic_shards(tmp_path_factory.mktemp("uneven"), num_samples=100, samples_per_shard=24, seed=3)


@pytest.fixture(scope="session")
def helpers():
    """The tar-building helpers of this conftest, for the test modules."""

    class Helpers:
        pass

    Helpers.write_tar = staticmethod(write_tar)
    Helpers.image_bytes = staticmethod(image_bytes)
    Helpers.keys_in = staticmethod(keys_in)
    return Helpers
