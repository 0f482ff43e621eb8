"""Weights files a checkpoint leaves out: what it records of each, and how a moved file is found again.

A training checkpoint does not repeat the frozen weights it read from a file (the stage-1 VAE, a
released SD model). It records, for each such file, the path as given, the path as resolved, its size
and its sha256, so that the checkpoint can be used on another machine or after its run folder moved:
the file is looked for where it was, then under ``LDM_ROOT``, the models folder and beside the
checkpoint; a file with another hash is refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

HASH_CHUNK_BYTES = 1 << 24


class FrozenFileError(ValueError):
    """A weights file a checkpoint depends on is missing or is not the file it was trained with."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, or of every file below a folder (names and bytes, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def describe_file(path: str | Path) -> dict[str, Any]:
    """The record a checkpoint keeps of a weights file (or diffusers folder) it leaves out."""
    resolved = Path(path).expanduser().resolve()
    return {"path": str(path), "resolved_path": str(resolved), "size": _size(resolved),
            "sha256": file_sha256(resolved)}


def candidate_paths(record: Mapping[str, Any], search_dirs: Iterable[str | Path]) -> list[Path]:
    """Where a recorded file may be now: where it was, then each search folder joined with every tail
    of the recorded path (``models/demo/vae.safetensors``, ``demo/vae.safetensors``, ``vae.safetensors``)."""
    recorded = Path(record["resolved_path"])
    candidates = [recorded, Path(record["path"]).expanduser()]
    parts = recorded.parts[1:]
    for folder in search_dirs:
        candidates += [Path(folder).expanduser() / Path(*parts[start:]) for start in range(len(parts))]
    unique: list[Path] = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def default_search_dirs(checkpoint_path: str | Path | None = None) -> list[Path]:
    """``LDM_ROOT`` (and its ``models/``) when set, the current folder's ``models/``, and the checkpoint's
    folder and the two above it (a run folder keeps checkpoints in ``<run>/checkpoints/``)."""
    folders: list[Path] = []
    if os.environ.get("LDM_ROOT"):
        root = Path(os.environ["LDM_ROOT"])
        folders += [root, root / "models"]
    folders.append(Path.cwd() / "models")
    if checkpoint_path is not None:
        folder = Path(checkpoint_path).resolve().parent
        folders += [folder, folder.parent, folder.parent.parent]
    return folders


def resolve_frozen_file(record: Mapping[str, Any], option: str, given: str | Path | None = None,
                        search_dirs: Iterable[str | Path] = ()) -> Path:
    """The file ``record`` describes: ``given`` (checked against the recorded hash) or the first candidate
    whose hash matches. Raises ``FrozenFileError`` in one line naming the file, its hash and ``option``,
    the option that supplies it."""
    expected = record["sha256"]
    name = Path(record["path"]).name
    if given is not None:
        given = Path(given).expanduser()
        if not given.exists():
            raise FrozenFileError(f"{option}={given}: no such file")
        actual = file_sha256(given) if expected else None
        if actual != expected:
            raise FrozenFileError(f"{option}={given} has sha256 {actual}, but the checkpoint was trained with "
                                  f"{name} of sha256 {expected}; give that file")
        return given
    mismatched = []
    for candidate in candidate_paths(record, search_dirs):
        if not candidate.exists():
            continue
        # A file of another size cannot have the same hash: skip reading it.
        if expected is None:  # a record from before hashes were kept: the path is all there is to check
            return candidate
        if _size(candidate) == record.get("size") and file_sha256(candidate) == expected:
            return candidate
        mismatched.append(str(candidate))
    found_other = f"; {', '.join(mismatched)} {'is' if len(mismatched) == 1 else 'are'} another file" if mismatched else ""
    raise FrozenFileError(f"the checkpoint needs {record['path']} (sha256 {expected}), which is not where it was "
                          f"trained nor under LDM_ROOT, models/ or beside the checkpoint{found_other}; "
                          f"give it with {option}")
