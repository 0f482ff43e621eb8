"""The stratified validation loss depends on the weights alone: not on the validation, the batch size or the
number of processes; its timesteps cover every bin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.diffusion.stratified import stratified_quantiles
from ldm.diffusion.training_objectives import EDM, DiscreteDiffusion, FlowMatching

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def test_stratified_quantiles_fall_one_in_each_bin_and_repeat_with_the_seed():
    draws = torch.stack([stratified_quantiles(torch.Generator().manual_seed(s), 10) for s in range(200)])
    assert ((draws * 10).floor().long() == torch.arange(10)).all()  # quantile k lies in bin k
    assert draws.min() < 0.005 and draws.max() > 0.995  # the whole range is reachable
    assert torch.equal(stratified_quantiles(torch.Generator().manual_seed(3), 10), draws[3])
    with pytest.raises(ValueError, match="num_bins"):
        stratified_quantiles(torch.Generator(), 0)


@pytest.mark.parametrize("objective", [DiscreteDiffusion(), FlowMatching(), EDM()], ids=repr)
def test_each_bin_holds_an_equal_share_of_the_objectives_training_levels(objective):
    """Bin edges mapped through the objective: a tenth of its training draws falls between each pair."""
    edges = objective.levels_from_quantiles(torch.linspace(0, 1, 11).clamp(1e-5, 1 - 1e-5), 1000).double()
    training = objective.sample_levels(20_000, 1000, torch.Generator().manual_seed(0), torch.device("cpu"), None, 0.0)
    counts = torch.bucketize(training.double(), edges[1:-1], right=True).bincount(minlength=10)
    # 2000 expected per bin; binomial std ~42, so 10% (about 5 std) is a failure of the mapping, not chance.
    assert ((counts - 2000).abs() < 200).all(), counts.tolist()
    if isinstance(objective, DiscreteDiffusion):
        assert edges.tolist()[:-1] == list(range(0, 1000, 100))  # equal-width bins of t


def run(devices: int, batch_per_rank: int, output: Path) -> list[dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(HERE / "stratified_loss_run.py"), str(devices), str(batch_per_rank),
                             str(output)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output, weights_only=True)


@pytest.mark.whole_machine
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


@pytest.mark.parametrize("objective", ["flow", "edm"])
def test_the_stratified_loss_runs_for_every_objective(objective):
    import lightning as L
    from hydra import compose, initialize_config_dir
    from torch.utils.data import DataLoader

    from ldm.config import instantiate_module

    sys.path.insert(0, str(HERE))
    from stratified_loss_run import KeyedImages

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "model.latents.vae_weights=null", "model.latents.scale_factor=0.5",
                                          f"model/objective={objective}",
                                          "model.validation.subset=1.0"])
    torch.manual_seed(0)
    module = instantiate_module(cfg.model)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(module, DataLoader(KeyedImages(), batch_size=5), verbose=False)
    bins = [float(trainer.callback_metrics[f"val/loss_bin_{k}"]) for k in range(10)]
    assert all(value > 0 for value in bins) and len(set(bins)) == 10
    assert float(trainer.callback_metrics["val/loss_stratified"]) == pytest.approx(sum(bins) / 10, rel=1e-6)
