"""Signals that end training lose nothing: at the end of the current step ``last.ckpt`` is written and the run stops.

SLURM's warning signals (preemption, time limit) also requeue the job; Ctrl-C (SIGINT) and SIGTERM only stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class CheckpointAndRequeue(L.Callback):
    """Turns a preemption/time-limit signal into a clean checkpoint and a requeued job, and a stop signal
    (Ctrl-C, SIGTERM) into a clean checkpoint and a stop.

    SLURM sends ``signals`` (submitit's ``--signal=USR2@<signal_delay_s>``; Lightning's own is USR1)
    some time before it kills the job. The handler installed here only sets a flag; at the end of
    the current training batch all ranks agree, write ``{dirpath}/last.ckpt`` (atomically, through the
    trainer's checkpoint IO), and the job is requeued: by the handler that was there before (submitit's,
    which also records the resubmission) or else by ``scontrol requeue $SLURM_JOB_ID``. Training then
    stops; the requeued job runs the same command, and ``ckpt_path=last`` resumes from that file.
    Saving inside the signal handler instead could catch the optimizer half-way through a step.

    ``stop_signals`` (Ctrl-C's SIGINT, SIGTERM) do the same without the requeue, so that ``ckpt_path=.../last.ckpt``
    continues the run exactly; the same signal a second time stops at once (KeyboardInterrupt). Lightning's own
    SIGTERM handling, which raises at the end of the step without a checkpoint, is replaced while training runs.
    ``stopped_by``: the stop signal that ended the run, if one did (train.py then exits with 128 + its number).
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGUSR1", "SIGUSR2"), dirpath: str | None = None,
                 requeue: bool = True, stop_signals: tuple[str, ...] | list[str] = ("SIGINT", "SIGTERM")) -> None:
        self.signal_numbers = [self._number(name, "signals") for name in signals]
        self.stop_signal_numbers = [self._number(name, "stop_signals") for name in stop_signals]
        both = set(self.signal_numbers) & set(self.stop_signal_numbers)
        if both:
            raise ValueError(f"callbacks.preemption: {sorted(signal.Signals(n).name for n in both)} in both signals "
                             "(checkpoint and requeue) and stop_signals (checkpoint and stop); keep each in one")
        self.dirpath = dirpath
        self.requeue = requeue
        self.received: int | None = None
        self.stopped_by: int | None = None
        self._previous: dict[int, Any] = {}  # each signal's handler before setup
        self._installed = False

    @staticmethod
    def _number(name: str, option: str) -> int:
        if not isinstance(getattr(signal, name, None), signal.Signals):
            raise ValueError(f"callbacks.preemption.{option}: unknown signal {name!r}; use names like 'SIGUSR1'")
        return int(getattr(signal, name))

    def _handle(self, signum: int, frame: Any) -> None:
        if not self._installed:  # left in place by the Trainer's teardown after an exception: act as before
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if signum in self.stop_signal_numbers:
            if self.received == signum:  # asked twice: the user does not want to wait for the step
                raise KeyboardInterrupt
            sys.stderr.write(f"{signal.Signals(signum).name}: stopping after the current step and writing last.ckpt "
                             "(send it again to stop at once, without a checkpoint)\n")
        self.received = signum

    def _install(self) -> None:
        if not self._installed:
            self._previous = {number: signal.getsignal(number)
                              for number in [*self.signal_numbers, *self.stop_signal_numbers]}
            self._installed = True
        for number in self._previous:
            if signal.getsignal(number) != self._handle:
                signal.signal(number, self._handle)

    def _restore(self) -> None:
        if self._installed:
            for number, previous in self._previous.items():
                signal.signal(number, previous if previous is not None else signal.SIG_DFL)
            self._installed = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Installed before the Trainer registers its own handlers (it leaves a signal that has one alone).
        self._install()

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The Trainer has by now wrapped SIGTERM in its own handler (flag, then SIGTERMException at the end of
        # the step, without a checkpoint): take it back. Its teardown restores ours, ours the original.
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()  # teardown hooks are not called after an exception

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        directory = self.dirpath or (trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback
                                     else trainer.default_root_dir)
        return Path(directory) / "last.ckpt"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        # Every rank takes the same branch: a stop signal on any rank stops all (Ctrl-C reaches them all anyway).
        stop = trainer.strategy.reduce_boolean_decision(self.received in self.stop_signal_numbers, all=False)
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        if stop:
            self.stopped_by = self.received if self.received in self.stop_signal_numbers else signal.SIGTERM
            rank_zero_info(f"{signal.Signals(self.stopped_by).name}: checkpoint of step {trainer.global_step} written "
                           f"to {path}; continue with ckpt_path={path}")
        else:
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


def stop_signal_exit_status(callbacks: list[Any]) -> int | None:
    """128 + the number of the stop signal that ended training (the shell's convention: 130 for Ctrl-C, 143 for
    SIGTERM), or None when no ``CheckpointAndRequeue`` among ``callbacks`` was stopped by one."""
    for callback in callbacks:
        if isinstance(callback, CheckpointAndRequeue) and callback.stopped_by is not None:
            return 128 + int(callback.stopped_by)
    return None
