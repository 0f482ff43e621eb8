"""Precomputed latent shards: writing them, and reading them as a training stream with no VAE encode.

A latent shard keeps the keys, captions and JSON of its image shard; per sample:
``KEY.latent_mean.npy`` and ``KEY.latent_std.npy`` (the VAE posterior, (C, h, w) float16, unscaled,
so training still draws ``mean + std * eps`` like the VAE path), optionally ``KEY.text_states.npy``
(the frozen text encoder's output for the caption, (L, D) float16; for several towers their states
concatenated) and ``KEY.text_pooled.npy`` (an SDXL-class conditioner's pooled embedding, (P,) float16),
``KEY.txt`` and ``KEY.json`` (the image's metadata plus ``original_size``, ``crop_coords`` and
``target_size``, the pixel size it was encoded at: its bucket's). A folder of latent shards holds
``latents.json``: the VAE and text encoder configs, their weights files' paths and sha256, the resolution and
the buckets they were made with; ``check_latent_manifests`` holds a training run to them.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ldm.config_check import ConfigError
from ldm.data.stream import ShardStream
from ldm.data.skips import SkipCounter

MANIFEST_NAME = "latents.json"
logger = logging.getLogger(__name__)


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as .npy bytes."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# Every array of a latent shard has one of a few headers; numpy parses each header with ast.literal_eval, which
# costs more than the copy of the array itself. Parsed headers are kept by their bytes: (dtype, shape, offset).
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}
_NPY_MAGIC = b"\x93NUMPY\x01\x00"


def load_npy(data: bytes) -> np.ndarray:
    """.npy bytes -> array (a writable copy); never unpickles (a shard cannot run code)."""
    if data[:8] != _NPY_MAGIC or len(data) < 10:  # other versions go through numpy's own reader
        return np.load(io.BytesIO(data), allow_pickle=False)
    offset = 10 + int.from_bytes(data[8:10], "little")
    header = data[10:offset]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        stream = io.BytesIO(data)
        np.lib.format.read_magic(stream)
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        if fortran_order or dtype.hasobject:
            return np.load(io.BytesIO(data), allow_pickle=False)
        parsed = (dtype, shape, offset)
        if len(_NPY_HEADERS) < 256:  # shards of other shapes cannot grow it without bound
            _NPY_HEADERS[header] = parsed
    dtype, shape, offset = parsed
    count = int(np.prod(shape))
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"truncated .npy: {len(data) - offset} bytes for shape {shape} of {dtype}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).copy()


def latent_sample_files(
    key: str,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    caption: str,
    metadata: dict,
    text_states: torch.Tensor | None = None,
    text_pooled: torch.Tensor | None = None,
) -> dict[str, bytes | str]:
    """One latent sample as webdataset ``TarWriter`` fields. latent_mean/std: (C, h, w); text_states: (L, D);
    text_pooled: (P,)."""
    files: dict[str, bytes | str] = {
        "__key__": key,
        "latent_mean.npy": npy_bytes(latent_mean.detach().float().cpu().numpy().astype(np.float16)),
        "latent_std.npy": npy_bytes(latent_std.detach().float().cpu().numpy().astype(np.float16)),
        "txt": caption.encode(),
        "json": json.dumps(metadata, sort_keys=True, default=str).encode(),
    }
    if text_states is not None:
        files["text_states.npy"] = npy_bytes(text_states.detach().float().cpu().numpy().astype(np.float16))
    if text_pooled is not None:
        files["text_pooled.npy"] = npy_bytes(text_pooled.detach().float().cpu().numpy().astype(np.float16))
    return files


class LatentTextDataset(ShardStream):
    """Latent-caption samples from latent shards; the modes, sources, filters, caption choice and
    dropout, skip counting and skip-rate ceiling are those of ``ShardStream``.

    Each sample: ``{"latent_mean", "latent_std": (C, h, w) float32, "caption": str, "key": str,
    "original_size", "crop_coords", "target_size": (2,) long, ["text_states": (L, D) float32 when
    use_text_states, and "text_pooled": (P,) float32 when the shards hold it], "skipped": {reason: count}}``.
    Samples of several stored sizes (buckets) batch by shape (``batch_size``). A sample whose arrays are
    unreadable, non-finite, whose mean and std differ in shape, or lacking text states that ``use_text_states``
    asks for, is skipped as ``corrupt_latent``.
    """

    def __init__(self, shards: str | Sequence[str] | Sequence[Sequence[str]], train: bool, mode: str | None = None,
                 use_text_states: bool = False, **stream_options) -> None:
        super().__init__(shards, mode or ("resampled" if train else "exactly_once"), augment=train, **stream_options)
        self.use_text_states = use_text_states

    def decode(self, raw: dict, metadata: dict, rng: np.random.Generator | None, counter: SkipCounter) -> dict | None:
        """Latent arrays -> tensors; None (counted as ``corrupt_latent``) when unusable."""
        url = raw["__url__"]
        where = f"{url} {raw['__key__']}"
        names = ["latent_mean.npy", "latent_std.npy"] + (["text_states.npy"] if self.use_text_states else [])
        if self.use_text_states and "text_pooled.npy" in raw:  # an SDXL-class conditioner's pooled embedding
            names.append("text_pooled.npy")
        missing = [name for name in names if name not in raw]
        if missing:
            counter.add("corrupt_latent", f"{where} has no {', '.join(missing)} (made without --text-encoder?)",
                        shard=url)
            return None
        try:
            arrays = [load_npy(raw[name]) for name in names]
        except Exception as error:  # truncated or not .npy
            counter.add("corrupt_latent", f"{where}: {type(error).__name__}: {error}", shard=url)
            return None
        shapes = tuple(array.shape for array in arrays)
        if shapes[0] != shapes[1] or len(shapes[0]) != 3 or not all(np.isfinite(array).all() for array in arrays):
            counter.add("corrupt_latent", f"{where}: mean and std of shapes {shapes[:2]} or non-finite values",
                        shard=url)
            return None
        resolution = metadata.get("resolution", 0)
        sample = {
            "latent_mean": torch.from_numpy(arrays[0].astype(np.float32)),
            "latent_std": torch.from_numpy(arrays[1].astype(np.float32)),
            "original_size": torch.tensor(metadata.get("original_size", [0, 0]), dtype=torch.long),
            "crop_coords": torch.tensor(metadata.get("crop_coords", [0, 0]), dtype=torch.long),
            "target_size": torch.tensor(metadata.get("target_size", [resolution, resolution]), dtype=torch.long),
        }
        if self.use_text_states:
            sample["text_states"] = torch.from_numpy(arrays[2].astype(np.float32))
            if len(arrays) > 3:
                sample["text_pooled"] = torch.from_numpy(arrays[3].astype(np.float32))
        return sample


def sample_latents(latent_mean: torch.Tensor, latent_std: torch.Tensor, sample_posterior: bool = True) -> torch.Tensor:
    """Unscaled latents (B, C, h, w) from a stored posterior: ``mean + std * eps``, or the mean."""
    if not sample_posterior:
        return latent_mean
    return latent_mean + latent_std * torch.randn_like(latent_mean)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A latent folder's ``latents.json``; ``ConfigError`` naming the file when it is not a JSON mapping."""
    try:
        manifest = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as error:
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise ConfigError(f"{path} is unreadable ({reason}); make the latents again with "
                          "python -m ldm.tools.precompute_latents into a new --out-dir") from error
    if not isinstance(manifest, dict):
        raise ConfigError(f"{path} holds {type(manifest).__name__}, not the mapping precompute_latents writes")
    return manifest


def check_latent_manifests(urls: Sequence[str], resolution: int, use_text_states: bool,
                           vae_weights: Mapping[str, Any] | None = None) -> None:
    """Refuse to train on latent shards made with other settings than the run's, naming the key to change.

    ``urls``: the local latent shards; each folder's ``latents.json`` is compared with ``resolution``
    (``data.resolution``), ``use_text_states`` (``data.use_text_states``: the shards must hold text states) and
    ``vae_weights``, the run's ``model.latents.vae_weights`` record (``describe_file``: path and sha256). Latents made by
    another VAE are refused naming both hashes: the model's decoder could not read them. A folder without a
    manifest (shards written by other means) is not checked; one from before hashes were kept is warned about.
    """
    folders = sorted({os.path.dirname(os.path.abspath(url)) for url in urls if os.path.isfile(url)})
    for folder in folders:
        path = os.path.join(folder, MANIFEST_NAME)
        if not os.path.isfile(path):
            continue
        manifest = read_manifest(path)
        made_at = manifest.get("resolution")
        if made_at is not None and made_at != resolution:
            raise ConfigError(f"data.resolution={resolution}, but the latents in {folder} were made at resolution "
                              f"{made_at} ({path}); set data.resolution={made_at}, or precompute them at {resolution}")
        if use_text_states and manifest.get("text_encoder", True) is None:
            raise ConfigError(f"data.use_text_states=true, but the latents in {folder} hold no text states (made "
                              f"without --text-encoder, {path}); set data.use_text_states=false or precompute them "
                              "with --text-encoder")
        if vae_weights is None:
            continue
        if "vae_sha256" not in manifest:
            logger.warning("%s records no VAE hash (made before hashes were kept): model.latents.vae_weights=%s is not "
                           "checked against the VAE that made these latents", path, vae_weights["path"])
            continue
        made_with = manifest["vae_sha256"]
        if made_with != vae_weights["sha256"]:
            raise ConfigError(
                f"model.latents.vae_weights={vae_weights['path']} has sha256 {vae_weights['sha256']}, but the latents in "
                f"{folder} were made with {manifest.get('vae_weights') or 'a VAE without weights file'} of sha256 "
                f"{made_with} ({path}); train with that VAE, or precompute the latents with this one")
