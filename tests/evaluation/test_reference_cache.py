"""The reference-feature cache is keyed by the shards' contents and checked when read back."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.evaluation.metrics import fid_from_features
from ldm.evaluation.reference import reference_features


def write_reference_shard(path: Path, seed: int, num_images: int = 48) -> Path:
    """One shard of random 32x32 PNGs, stored uncompressed: any seed gives a file of the same size."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(num_images):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG", compress_level=0)
            for extension, data in (("png", buffer.getvalue()), ("txt", f"image {index}".encode())):
                info = tarfile.TarInfo(f"{index:06d}.{extension}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return path


def pooled_pixels(images: torch.Tensor) -> torch.Tensor:
    """A deterministic 48-dim feature: the image's mean colour over a 4x4 grid."""
    return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)


def test_other_images_under_the_same_names_and_sizes_give_the_new_sets_fid(tmp_path):
    shard, cache = tmp_path / "ref" / "val-000000.tar", tmp_path / "cache"
    generated = pooled_pixels(torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(7))).double()
    write_reference_shard(shard, seed=0)
    size = shard.stat().st_size
    old, _, old_file = reference_features(str(shard), 32, pooled_pixels, "pooled", cache)
    write_reference_shard(shard, seed=1)  # other images: same shard name, same byte size
    assert shard.stat().st_size == size
    new, _, new_file = reference_features(str(shard), 32, pooled_pixels, "pooled", cache)
    fresh, _, _ = reference_features(str(shard), 32, pooled_pixels, "pooled", None)
    assert new_file != old_file
    assert fid_from_features(new, generated) == fid_from_features(fresh, generated)
    assert fid_from_features(old, generated) != fid_from_features(new, generated)


@pytest.mark.parametrize("damage", ["cut", "non-finite", "rows"])
def test_a_damaged_cache_file_is_named(tmp_path, damage):
    shard = write_reference_shard(tmp_path / "ref" / "val-000000.tar", seed=0, num_images=8)
    _, captions, path = reference_features(str(shard), 32, pooled_pixels, "pooled", tmp_path / "cache")
    if damage == "cut":
        path.write_bytes(path.read_bytes()[:50])
    else:
        features = torch.full((8, 48), float("nan"), dtype=torch.float64) if damage == "non-finite" else \
            torch.zeros(5, 48, dtype=torch.float64)
        save_file({"features": features}, str(path), metadata={"captions": __import__("json").dumps(captions)})
    with pytest.raises(ValueError, match=f"reference feature cache {path} .*delete it"):
        reference_features(str(shard), 32, pooled_pixels, "pooled", tmp_path / "cache")
