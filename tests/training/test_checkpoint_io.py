"""Atomic checkpoint writes: a writer killed at any moment leaves the old file or the new one, whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from ldm.training.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from ldm.training.model_checkpoint import ModelCheckpoint

ROOT = Path(__file__).resolve().parents[2]
WRITER = """
import sys, torch
from ldm.training.checkpoint_io import atomic_torch_save
version = 0
while True:
    version += 1
    atomic_torch_save({"version": version, "payload": torch.full((4_000_000,), float(version))}, sys.argv[1])
    print(version, flush=True)
"""


def test_a_writer_killed_mid_write_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "last.ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for delay in (0.05, 0.17):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        process.stdout.readline()  # at least one version written
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert torch.equal(state["payload"], torch.full((4_000_000,), float(state["version"])))
    atomic_torch_save({"version": -1}, path)  # the next write clears what killed writers left
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_checkpoints_go_through_the_atomic_io(tmp_path, monkeypatch):
    written = []
    original = atomic_torch_save
    monkeypatch.setattr("ldm.training.checkpoint_io.atomic_torch_save",
                        lambda obj, path: (written.append(Path(path).name), original(obj, path)))
    data = TensorDataset(torch.randn(8, 2), torch.randn(8, 1))
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True,
                                                     save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoint], plugins=[AtomicCheckpointIO()])
    trainer.fit(Regression(), DataLoader(data, batch_size=2))
    assert "last.ckpt" in written and any(name.startswith("epoch") for name in written)
    assert all(not name.startswith(".") for name in os.listdir(tmp_path))
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4


class StopAt(L.Callback):
    """Stops training after ``step`` optimizer steps, as trainer.max_time or a guard does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_a_run_stopped_between_saves_leaves_last_ckpt_at_its_final_step(tmp_path):
    data = TensorDataset(torch.randn(64, 2), torch.randn(64, 1))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="step_{step:06d}", auto_insert_metric_name=False,
                                 every_n_train_steps=4, save_last=True,
                                 save_top_k=-1, enable_version_counter=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=100, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StopAt(6), checkpoint], plugins=[AtomicCheckpointIO()])
    trainer.fit(Regression(), DataLoader(data, batch_size=2))
    assert trainer.global_step == 6
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "step_000004.ckpt"]
