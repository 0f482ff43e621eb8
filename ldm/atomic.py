"""Files and folders that appear whole or not at all: written beside their target, fsynced, renamed into place.

Every temp-then-rename write in ldm goes through ``atomic_write``: weights, checkpoints, shards,
manifests, diffusers folders, the built-in data set.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_INFIX = ".tmp-"


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, what it wrote there (a
    file or a folder) is fsynced and renamed onto ``path``, so that a kill at any moment leaves the old
    content or the new, never a part.

    The temporary name is ``.{name}.tmp-{pid}-{random}`` in the same directory (a rename is atomic only
    within one file system); the directory is fsynced after the rename so that it survives a power cut.
    A file replaces an existing one; a folder must not exist yet (remove the old one inside the block).
    A block that leaves nothing at the temporary path writes nothing; one that raises leaves nothing
    behind. What is renamed into place has the permissions the user's umask gives new files and folders. Temporary files of writers that were killed (their process is gone) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(str(path.parent / f".{glob.escape(path.name)}{TEMP_INFIX}*")):
        _remove_if_orphaned(Path(stale))
    temporary = path.parent / f".{path.name}{TEMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield temporary
        if temporary.exists():
            _umask_modes(temporary)
            _fsync_tree(temporary)
            os.replace(temporary, path)
            _fsync(path.parent)
    finally:
        _remove(temporary)


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it back at once
    os.umask(mask)
    return mask


def _umask_modes(path: Path) -> None:
    """Give what a writer made the mode any new file or folder gets under the user's umask: some writers
    (safetensors) create their files 0o600, which a group sharing the models folder could not read."""
    mask = _current_umask()
    entries = [path]
    if path.is_dir():
        entries += [Path(folder) / name for folder, folders, files in os.walk(path) for name in folders + files]
    for entry in entries:
        if not entry.is_symlink():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's content to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder of a tree (the folders too, so their entries are on disk)."""
    if path.is_dir():
        for folder, _, files in os.walk(path):
            for name in files:
                _fsync(Path(folder) / name)
            _fsync(Path(folder))
    else:
        _fsync(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_if_orphaned(temporary: Path) -> None:
    """Remove a temporary file or folder whose writing process no longer runs (it was killed mid-write)."""
    try:
        pid = int(temporary.name.rsplit(TEMP_INFIX, 1)[1].split("-")[0])
        os.kill(pid, 0)
        if pid != os.getpid():
            return  # another live process is writing it
    except (ValueError, ProcessLookupError):
        pass
    except PermissionError:
        return  # alive, owned by someone else
    _remove(temporary)


def refuse_existing(path: str | os.PathLike, option: str, overwrite: bool = False) -> Path:
    """``path``, unless something is there and ``overwrite`` is false: then ``FileExistsError`` in one line naming
    it and ``option``, the option that allows replacing it (``--overwrite``, ``overwrite=true``).

    Every writer of ldm's outputs (weights, exports, shards) calls this before it starts, so that nothing a user
    or another run depends on is replaced silently (a retrained stage-1 VAE would orphan every checkpoint
    recorded against its hash)."""
    path = Path(path)
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} exists; set {option} to replace it, or write to another path")
    return path


def remove_output(path: str | os.PathLike) -> None:
    """Remove an output that ``--overwrite`` replaces (a folder with what it holds; a link itself, not its target)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
