"""Preemption on SLURM: on the scheduler's warning signal, save a checkpoint at the next step, requeue, stop."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class CheckpointAndRequeue(L.Callback):
    """Turns a preemption/time-limit signal into a clean checkpoint and a requeued job.

    SLURM sends ``signals`` (submitit's ``--signal=USR2@<signal_delay_s>``; Lightning's own is USR1)
    some time before it kills the job. The handler installed here only sets a flag; at the end of
    the current training batch all ranks agree, write ``{dirpath}/last.ckpt`` (atomically, through the
    trainer's checkpoint IO), and the job is requeued: by the handler that was there before (submitit's,
    which also records the resubmission) or else by ``scontrol requeue $SLURM_JOB_ID``. Training then
    stops; the requeued job runs the same command, and ``ckpt_path=last`` resumes from that file.
    Saving inside the signal handler instead could catch the optimizer half-way through a step.
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGUSR1", "SIGUSR2"), dirpath: str | None = None,
                 requeue: bool = True) -> None:
        self.signal_numbers = []
        for name in signals:
            if not hasattr(signal, name):
                raise ValueError(f"callbacks.preemption.signals: unknown signal {name!r}; use names like 'SIGUSR1'")
            self.signal_numbers.append(getattr(signal, name))
        self.dirpath = dirpath
        self.requeue = requeue
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Installed before the Trainer registers its own handlers (it leaves a signal that has one alone).
        for number in self.signal_numbers:
            self._previous[number] = signal.getsignal(number)
            signal.signal(number, self._handle)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        directory = self.dirpath or (trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback
                                     else trainer.default_root_dir)
        return Path(directory) / "last.ckpt"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"preemption signal: checkpoint of step {trainer.global_step} written to {path}")
        if self.requeue and trainer.is_global_zero:
            self._requeue()
        trainer.should_stop = True
        self.received = None

    def _requeue(self) -> None:
        previous: Callable | Any = self._previous.get(self.received) if self.received is not None else None
        if callable(previous):
            # submitit's handler requeues the job and exits the process (SystemExit, which Lightning lets through).
            previous(self.received, None)
            return
        job_id = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):  # an array task is requeued by its array id
            job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if not job_id:
            rank_zero_info("preemption signal outside SLURM: checkpoint written, not requeued")
            return
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode != 0:
            rank_zero_info(f"scontrol requeue {job_id} failed ({result.returncode}): {result.stderr.strip()}")
        else:
            rank_zero_info(f"requeued SLURM job {job_id}")
