"""DDP on 2 CPU processes (gloo) with batch B each updates the U-Net as 1 process with batch 2B does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def run(devices: int, batch_per_rank: int, output: Path) -> dict[str, dict[str, torch.Tensor]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(HERE / "ddp_equivalence_run.py"), str(devices), str(batch_per_rank),
                             str(output)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output, map_location="cpu", weights_only=True)


@pytest.mark.whole_machine
@pytest.mark.slow
def test_two_ranks_with_batch_b_update_like_one_rank_with_batch_2b(tmp_path):
    """Two SGD steps with gradient clipping: DDP's averaged gradients give the large batch's update."""
    single = run(1, 8, tmp_path / "single.pt")
    ddp = run(2, 4, tmp_path / "ddp.pt")
    largest_update = 0.0
    for key, before in single["before"].items():
        torch.testing.assert_close(ddp["before"][key], before, rtol=0, atol=0, msg=key)  # same initial weights
        update = single["after"][key] - before
        torch.testing.assert_close(ddp["after"][key] - before, update, rtol=1e-4, atol=1e-6, msg=key)
        largest_update = max(largest_update, update.abs().max().item())
    assert largest_update > 1e-3  # the steps moved the weights far beyond the tolerance
