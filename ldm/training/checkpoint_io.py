"""Checkpoint files that are either whole or absent: written to a temporary file, fsynced, renamed."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm.atomic import atomic_write
from ldm.checkpoints import NotACheckpointError


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` such that a kill at any moment leaves the old file or the new one, never a part
    (see ``ldm.atomic.atomic_write``)."""
    with atomic_write(path) as temporary:
        torch.save(obj, temporary)


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

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        """Lightning's load (resume, ``ckpt_path=``), with a file that is not a weights-only checkpoint refused in
        one line: torch's own message would advise loading it with ``weights_only=False``, which runs its code."""
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (FileNotFoundError, NotACheckpointError):
            raise
        except Exception as error:  # pickle, zip and torch errors alike
            raise NotACheckpointError(
                f"ckpt_path={path} is not a weights-only torch checkpoint ({type(error).__name__}): it is damaged, not "
                "a checkpoint, or holds objects other than tensors and plain values; ldm never loads such files"
            ) from None
