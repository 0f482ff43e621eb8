"""Checkpoint files that are either whole or absent: written to a temporary file, fsynced, renamed."""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

TEMP_INFIX = ".tmp-"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` such that a kill at any moment leaves the old file or the new one, never a part.

    The bytes go to ``.{name}.tmp-{pid}`` in the same directory (a rename is atomic only within one
    file system), are fsynced, and replace ``path`` with ``os.replace``; the directory is fsynced so the
    rename itself survives a power cut. Temporary files left by a writer that was killed are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(str(path.parent / f".{glob.escape(path.name)}{TEMP_INFIX}*")):
        _remove_if_orphaned(stale)
    temporary = path.parent / f".{path.name}{TEMP_INFIX}{os.getpid()}"
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with open(temporary, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _remove_if_orphaned(temporary: str) -> None:
    """Remove a temporary checkpoint whose writing process no longer runs (it was killed mid-write)."""
    try:
        pid = int(temporary.rsplit(TEMP_INFIX, 1)[1])
        os.kill(pid, 0)
        if pid != os.getpid():
            return  # another live process is writing it
    except (ValueError, ProcessLookupError):
        pass
    except PermissionError:
        return  # alive, owned by someone else
    Path(temporary).unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO for local paths whose files are never half-written (see ``atomic_torch_save``).

    Lightning's own IO writes through an fsspec transaction, whose local temporary file may lie on
    another file system (then the final move is a copy) and is not fsynced; a SIGKILL or a node
    failure there can leave a truncated ``last.ckpt``. Remote URLs (``s3://``...) keep Lightning's path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options (got {storage_options!r})")
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, path)
