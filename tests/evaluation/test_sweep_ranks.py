"""Optuna sweep with trainer=ddp: each rank re-runs the sweeper; seeded, every rank of a trial trains the same values."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = [
    "hparams_search=demo_optuna", "trainer=ddp", "hydra.sweeper.n_trials=2", "trainer.max_steps=2",
    "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
    "model.latents.vae_weights=null", "model.latents.scale_factor=0.5", "logger=csv",
    "data.batch_size=8", "data.val_batch_size=8", "data.synthetic.num_train=256", "data.synthetic.num_val=16",
    "data.synthetic.samples_per_shard=64", "callbacks.sample_grid.num_inference_steps=2",
    "callbacks.sample_grid.prompts=[a red circle on a white background]",
]


def sweep(tmp_path: Path, *overrides: str) -> tuple[int, str]:
    command = [sys.executable, str(ROOT / "train.py"), "-m", *TINY_RUN, f"paths.root_dir={tmp_path}",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    return completed.returncode, completed.stdout + completed.stderr


def launched_values_by_trial(log: str) -> dict[str, set[str]]:
    """Trial number -> the distinct swept values that processes launched that trial with."""
    launched = defaultdict(set)
    for number, overrides in re.findall(r"#(\d+) : (model\.optimizer\.lr=\S+ model\.ema_decay=\S+)", log):
        launched[number].add(overrides)
    return launched


@pytest.mark.whole_machine
@pytest.mark.slow
def test_seeded_sweep_gives_every_rank_of_a_trial_the_same_values_and_unseeded_is_stopped(tmp_path):
    code, log = sweep(tmp_path / "seeded")
    assert code == 0, log[-3000:]
    launched = launched_values_by_trial(log)
    assert set(launched) == {"0", "1"}
    assert all(len(values) == 1 for values in launched.values()), launched  # both ranks, one set of values
    assert launched["0"] != launched["1"]  # and the sweep did move on

    code, log = sweep(tmp_path / "unseeded", "hydra.sweeper.sampler.seed=null")
    assert code != 0
    assert "the ranks of this trial train with different hyperparameters" in log
