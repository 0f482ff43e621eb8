"""Weights read, written and checked safely.

Nothing here ever unpickles arbitrary objects: ``.safetensors`` files hold tensors only, and
``.ckpt``/``.pt`` files go through ``torch.load(weights_only=True)``. Foreign layouts (diffusers
folders, original SD files, CLIP text towers) are converted in ``ldm.interchange``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ldm.atomic import atomic_write


class CheckpointMismatchError(ValueError):
    """A state dict does not fit a module: lists the missing, unexpected and misshapen keys."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or a weights-only torch checkpoint (its ``state_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for truncated headers
            raise ValueError(f"{path} is not a readable safetensors file ({error}); re-export it") from error
    checkpoint = read_torch_file(path)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


class NotACheckpointError(ValueError):
    """A file that is not a weights-only torch checkpoint (or not a torch file at all)."""


def read_torch_file(path: str | Path) -> Any:
    """The contents of a ``.ckpt``/``.pt`` file loaded with ``weights_only=True`` (tensors and plain values).

    Any other file is refused in one line. torch's own message is not passed on: it advises loading
    with ``weights_only=False``, which would run code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike: the file is not what it claims to be
        raise NotACheckpointError(
            f"{path} is not a weights-only torch checkpoint ({type(error).__name__}): it is damaged, not a "
            "checkpoint, or holds objects other than tensors and plain values; ldm never loads such files") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty for other formats)."""
    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def check_state_dict(module: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise ``CheckpointMismatchError`` naming every missing, unexpected or misshapen key."""
    check_keys(module.state_dict(), state_dict, source=source, target=type(module).__name__)


def check_keys(expected: dict[str, Tensor], state_dict: dict[str, Tensor], source: str, target: str) -> None:
    """``check_state_dict`` against an explicit set of expected tensors (``target`` names their owner)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = sorted(
        f"{key}: {tuple(state_dict[key].shape)} in {source}, {tuple(expected[key].shape)} in the model"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if missing or unexpected or misshapen:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointMismatchError(
            f"{source} does not fit {target}; " + "; ".join(parts)
            + ". Check that the model config matches the one the weights were trained with."
        )


def load_weights(module: nn.Module, path: str | Path) -> dict[str, str]:
    """Load a weights file into ``module`` strictly; returns the file's metadata."""
    state_dict = read_state_dict(path)
    check_state_dict(module, state_dict, source=str(path))
    module.load_state_dict(state_dict)
    return read_metadata(path)


def save_weights(module: nn.Module | dict[str, Tensor], path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write a module's state dict as safetensors, atomically (``ldm.atomic.atomic_write``).

    Metadata values that are not strings are stored as JSON.
    """
    path = Path(path)
    state_dict = module.state_dict() if isinstance(module, nn.Module) else module
    tensors = {key: value.detach().contiguous().cpu() for key, value in state_dict.items()}
    text_metadata = {key: value if isinstance(value, str) else json.dumps(value) for key, value in (metadata or {}).items()}
    with atomic_write(path) as temporary:
        save_file(tensors, str(temporary), metadata=text_metadata)
    return path


def _flat(config: Any, prefix: str) -> dict[str, Any]:
    if isinstance(config, dict):
        return {k: v for name, value in config.items() for k, v in _flat(value, f"{prefix}.{name}").items()}
    return {prefix: config}


def check_resumable(checkpoint: dict[str, Any], state: dict[str, Tensor], model_config: dict[str, Any] | None,
                    path: str | Path | None = None) -> None:
    """Refuse in one line a checkpoint whose weights do not fit the module that resumes from it (``state``, the
    module's state dict): instead of torch's list of misshapen keys, the line names the model config keys that
    differ, the checkpoint's value (from the ``ldm_model_config`` it records) and the run's, both.

    Keys the checkpoint leaves out (frozen parts, a LoRA run's base weights) are not compared. The call site
    is the module's ``on_load_checkpoint``, before Lightning loads the state dict."""
    saved = checkpoint.get("state_dict", {})
    misfits = sorted(key for key, tensor in saved.items()
                     if key in state and tuple(state[key].shape) != tuple(getattr(tensor, "shape", ())))
    # a LoRA run's checkpoint holds its adapters alone: keys the checkpoint lacks are not a misfit
    unexpected = sorted(key for key in saved if key.startswith(("network.", "ema_network.")) and key not in state)
    if not misfits and not unexpected:
        return
    where = f"ckpt_path={path}" if path is not None else "the checkpoint"
    recorded, current = _flat(checkpoint.get("ldm_model_config") or {}, "model"), _flat(model_config or {}, "model")
    differing = [key for key in sorted(set(recorded) | set(current))
                 if recorded.get(key) != current.get(key) and not key.endswith("._target_")]
    if differing:
        shown = "; ".join(f"{key}={recorded.get(key)!r} there, {current.get(key)!r} here" for key in differing[:4])
        raise CheckpointMismatchError(f"{where} is of another architecture ({shown}); resume with the checkpoint's "
                                      "model config, or start a new run (ckpt_path=null)")
    first = (misfits or unexpected)[0]
    detail = (f"{first} is {tuple(saved[first].shape)} there, {tuple(state[first].shape)} here" if misfits
              else f"this model has no {first}")
    raise CheckpointMismatchError(f"{where} does not fit this model ({detail}); resume with the checkpoint's "
                                  "model config, or start a new run (ckpt_path=null)")
