"""Periodic checkpoints that also cover the steps after the last save when training stops early."""

from __future__ import annotations

from typing import Any

import lightning as L


class ModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus: when training ends between two saves (``trainer.max_time``,
    ``max_steps`` not a multiple of ``every_n_train_steps``, a guard that stops the run), ``last.ckpt``
    is written at the final step. Lightning's own only writes it at the end when nothing was saved
    before, so a run stopped by its time limit would leave ``last.ckpt`` behind its final weights."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._step_of_last_write: int | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Runs for every checkpoint the trainer writes, this callback's or another's (a preemption save).
        self._step_of_last_write = trainer.global_step
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        written = self._step_of_last_write == trainer.global_step
        if self.save_last and not written and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
