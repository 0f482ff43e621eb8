"""Non-finite guard: a step whose loss or gradients are NaN/inf is skipped and counted; a run of them stops training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn


class NonFiniteStepsError(RuntimeError):
    """Raised after ``max_consecutive`` training steps in a row had a non-finite loss or gradient."""


def gradients_are_finite(parameters: list[torch.nn.Parameter]) -> bool:
    """True when every gradient of ``parameters`` is finite (one device sync, whatever the count)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)  # a NaN or inf anywhere makes its tensor's norm non-finite
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


class NonFiniteGuard(L.Callback):
    """Skips optimizer steps whose gradients (hence loss) are not finite, counts them, stops after a run of them.

    Before each optimizer step (after backward, before clipping) the gradients are checked on every
    rank and the decision is shared (FSDP ranks hold different shards); a bad step's gradients are
    dropped, so the optimizer leaves weights and moments as they were. ``train/nonfinite_steps``
    logs the total so far. On the first bad step of a run, a checkpoint of the state before it is
    written to ``{checkpoint_dir}/before_nonfinite.ckpt`` (weights, EMA and optimizer are as before
    the bad step, since it changed nothing); after ``max_consecutive`` bad steps in a row training
    stops with ``NonFiniteStepsError`` naming that file. Under ``16-mixed`` the GradScaler already
    skips overflowing steps, so there the guard only counts.
    """

    def __init__(self, max_consecutive: int = 20, checkpoint_dir: str | None = None) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive={max_consecutive} must be >= 1 (e.g. 20)")
        self.max_consecutive = max_consecutive
        self.checkpoint_dir = checkpoint_dir
        self.total_skipped = 0
        self.consecutive = 0
        self.first_bad_step: int | None = None
        self._skipped_this_batch = False

    def _checkpoint_path(self, trainer: L.Trainer) -> Path:
        directory = self.checkpoint_dir or (trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback
                                            else trainer.default_root_dir)
        return Path(directory) / "before_nonfinite.ckpt"

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._skipped_this_batch = False

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        finite = trainer.strategy.reduce_boolean_decision(gradients_are_finite(parameters), all=True)
        self._skipped_this_batch |= not finite
        if not finite and self.consecutive == 0:
            self.first_bad_step = trainer.global_step
        if finite or trainer.precision == "16-mixed":
            return
        for parameter in parameters:
            parameter.grad = None  # optimizers pass over parameters without gradients

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._skipped_this_batch:
            if self.consecutive:
                rank_zero_warn(f"training recovered after {self.consecutive} non-finite step(s)")
            self.consecutive = 0
            self.first_bad_step = None
            return
        self.total_skipped += 1
        self.consecutive += 1
        pl_module.log("train/nonfinite_steps", float(self.total_skipped), batch_size=1)
        if self.consecutive == 1:
            rank_zero_warn(f"non-finite loss or gradient at step {self.first_bad_step}: step skipped")
            # The skipped step changed no weight, so this state is the one from before the bad run.
            trainer.save_checkpoint(self._checkpoint_path(trainer))
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteStepsError(
                f"{self.consecutive} training steps in a row (from step {self.first_bad_step}) had a non-finite "
                f"loss or gradient ({self.total_skipped} skipped in all); the state from before they began is in "
                f"{self._checkpoint_path(trainer)}. Lower model.optimizer.lr, keep trainer.gradient_clip_val, use "
                f"trainer.precision=bf16-mixed or 32-true, check the data; resume with ckpt_path=<that file>"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"total_skipped": self.total_skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_skipped = int(state_dict["total_skipped"])
