"""The stratified validation loss depends on the weights alone: not on the validation, the batch size or the
number of processes; its timesteps cover every bin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.diffusion.stratified import stratified_timesteps, timestep_bin_edges

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def test_stratified_timesteps_fall_one_in_each_bin_and_repeat_with_the_seed():
    edges = timestep_bin_edges(1000, 10)
    assert edges.tolist() == list(range(0, 1001, 100))
    draws = torch.stack([stratified_timesteps(torch.Generator().manual_seed(s), 1000, 10) for s in range(200)])
    bins = torch.bucketize(draws, edges[1:], right=True)
    assert (bins == torch.arange(10)).all()  # timestep k lies in bin k
    assert draws.min() == 0 or draws.min() < 5 and draws.max() > 995  # the whole range is reachable
    again = stratified_timesteps(torch.Generator().manual_seed(3), 1000, 10)
    assert torch.equal(again, draws[3])


def test_uneven_bins_cover_the_range_without_gaps():
    edges = timestep_bin_edges(7, 3)
    assert edges.tolist() == [0, 2, 4, 7]
    with pytest.raises(ValueError, match="num_bins"):
        timestep_bin_edges(5, 6)


def run(devices: int, batch_per_rank: int, output: Path) -> list[dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(HERE / "stratified_loss_run.py"), str(devices), str(batch_per_rank),
                             str(output)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output, weights_only=True)


@pytest.mark.slow
def test_same_weights_give_the_same_stratified_loss_on_one_or_two_processes(tmp_path):
    """Two validations in a row agree exactly; 1 process (batch 3) and 2 gloo processes (batch 2) to 1e-6."""
    single = run(1, 3, tmp_path / "single.pt")
    ddp = run(2, 2, tmp_path / "ddp.pt")
    names = {f"val/loss_bin_{k}" for k in range(10)} | {"val/loss_stratified"}
    assert names <= set(single[0])
    for name in names:
        assert single[0][name] == single[1][name], name  # unchanged model, second validation: identical
        assert ddp[0][name] == ddp[1][name], name
        assert abs(single[0][name] - ddp[0][name]) <= 1e-6, (name, single[0][name], ddp[0][name])
    bins = [single[0][f"val/loss_bin_{k}"] for k in range(10)]
    assert len(set(bins)) == 10  # each bin measured at its own timesteps


def test_the_plot_callback_keeps_one_row_per_validation_step_and_draws_the_curves(tmp_path):
    from types import SimpleNamespace

    from ldm.training.stratified_loss_plot import StratifiedLossPlot

    callback = StratifiedLossPlot(str(tmp_path))
    for step, scale in ((100, 1.0), (200, 0.5), (200, 0.4)):  # a repeated step (a resumed run) replaces its row
        metrics = {f"val/loss_bin_{k}": torch.tensor(scale * (k + 1)) for k in range(10)}
        metrics["val/loss_stratified"] = torch.tensor(scale * 5.5)
        trainer = SimpleNamespace(sanity_checking=False, global_step=step, callback_metrics=metrics)
        callback.on_validation_end(trainer, None)
    assert [row["step"] for row in callback.history] == [100, 200]
    assert callback.history[1]["loss_bins"][9] == pytest.approx(4.0)
    assert (tmp_path / "val_loss_bins.png").stat().st_size > 0
    restored = StratifiedLossPlot(str(tmp_path))
    restored.load_state_dict(callback.state_dict())
    assert restored.history == callback.history
