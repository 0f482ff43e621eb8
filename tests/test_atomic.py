"""atomic_write: the target holds the old content or the new, whole; nothing temporary is left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ldm.atomic import TEMP_INFIX, atomic_write


def test_a_file_is_replaced_only_when_the_block_succeeds(tmp_path):
    path = tmp_path / "weights.bin"
    with atomic_write(path) as temporary:
        temporary.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    with atomic_write(path) as temporary:
        temporary.write_bytes(b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_a_folder_appears_whole_and_a_block_that_removes_its_work_writes_nothing(tmp_path):
    folder = tmp_path / "model"
    with atomic_write(folder) as staging:
        (staging / "unet").mkdir(parents=True)
        (staging / "unet" / "config.json").write_text("{}")
        assert not folder.exists()
    assert (folder / "unet" / "config.json").read_text() == "{}"
    with atomic_write(tmp_path / "nothing") as temporary:
        temporary.write_text("changed my mind")
        temporary.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # that process has exited
    dead = tmp_path / f".last.ckpt{TEMP_INFIX}{dead_pid}-0000abcd"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        alive = tmp_path / f".last.ckpt{TEMP_INFIX}{live.pid}-0000abcd"
        dead.write_bytes(b"partial")
        alive.write_bytes(b"being written")
        with atomic_write(tmp_path / "last.ckpt") as temporary:
            temporary.write_bytes(b"whole")
        assert not dead.exists() and alive.exists()
    finally:
        live.kill()
        live.wait()


def test_written_files_keep_the_permissions_the_umask_gives(tmp_path):
    """Weights written through a temporary file get the mode any new file gets (0o666 less the umask), not a
    temporary file's 0o600, so a group that reads the models folder can read a retrained VAE too."""
    import os

    import torch

    from ldm.checkpoints import save_weights

    previous = os.umask(0o027)
    try:
        path = save_weights({"weight": torch.zeros(2)}, tmp_path / "vae.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640
