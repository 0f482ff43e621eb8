"""Folders that several tests build, made once per test session for every pytest-xdist worker, and the locks
that share one machine between the workers (see docs/testing.md)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def session_folder(tmp_path_factory) -> Path:
    """A folder of this test session that every xdist worker sees (the controller's basetemp)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") and base.name.startswith("gw") else base


@contextlib.contextmanager
def file_lock(path: Path, exclusive: bool = True) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- Built once, shared -------------------------------------------------------------------------------------
# What a shared folder's contents depend on besides its settings: the library, configs and entry points.
CODE = ("ldm", "configs", "train.py", "eval.py", "notebooks/tiny_model.py")


def code_fingerprint(paths=CODE) -> str:
    """sha256 of the contents of the Python and YAML files under ``paths`` (relative to the repository), with
    the torch version: a change to any of them makes a shared folder anew."""
    import torch

    digest = hashlib.sha256(torch.__version__.encode())
    for entry in paths:
        path = ROOT / entry
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if file.suffix in (".py", ".yaml") and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def shared_folder(tmp_path_factory, name: str, settings: dict, build: Callable[[Path], None]) -> Path:
    """The folder ``build(folder)`` fills, made once per session for every xdist worker (under the session's
    temporary folder, or ``$LDM_TEST_CACHE`` when set, where it outlives the session) and keyed by a
    fingerprint of ``settings`` and of the code. A worker that asks while another builds it waits for it."""
    fingerprint = hashlib.sha256((json.dumps(settings, sort_keys=True, default=str) + code_fingerprint())
                                 .encode()).hexdigest()[:16]
    cache = Path(os.environ["LDM_TEST_CACHE"]) if os.environ.get("LDM_TEST_CACHE") else (
        session_folder(tmp_path_factory) / "shared")
    folder = cache / f"{name}-{fingerprint}"
    with file_lock(cache / f"{name}-{fingerprint}.lock"):
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a build that was interrupted
            folder.mkdir(parents=True)
            build(folder)
            (folder / "settings.json").write_text(json.dumps(settings, sort_keys=True, default=str, indent=1))
            (folder / ".complete").touch()
    return folder
