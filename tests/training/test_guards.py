"""Non-finite guard: bad steps are skipped and counted, a run of them stops with the pre-run checkpoint;
start-up checks name the config keys of an image size the VAE or U-Net cannot divide."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ldm.training.module_checks import check_resolution
from ldm.training.guards import NonFiniteGuard, NonFiniteStepsError


class SometimesNaN(L.LightningModule):
    """Linear regression whose loss is NaN at the given (0-based) batch indices."""

    def __init__(self, bad_batches: set[int]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.bad_batches = bad_batches
        self.weights_seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.weights_seen.append(self.layer.weight.detach().clone())
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        return loss * math.nan if self.trainer.global_step in self.bad_batches else loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def fit(module: L.LightningModule, guard: NonFiniteGuard, tmp_path, steps: int) -> L.Trainer:
    data = TensorDataset(torch.randn(64, 2), torch.randn(64, 1))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[guard], default_root_dir=tmp_path,
                        enable_checkpointing=False, gradient_clip_val=1.0)
    trainer.fit(module, DataLoader(data, batch_size=4))
    return trainer


def test_nonfinite_steps_are_skipped_counted_and_training_goes_on(tmp_path):
    module, guard = SometimesNaN({2, 3}), NonFiniteGuard(max_consecutive=3)
    trainer = fit(module, guard, tmp_path, steps=6)
    seen = module.weights_seen
    assert torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[4])  # the bad steps changed nothing
    assert not torch.equal(seen[4], seen[5])  # the good step after them trains again
    assert torch.isfinite(module.layer.weight).all()
    assert guard.total_skipped == 2 and trainer.callback_metrics["train/nonfinite_steps"] == 2


def test_a_run_of_nonfinite_steps_stops_with_the_checkpoint_from_before(tmp_path):
    module, guard = SometimesNaN(set(range(3, 100))), NonFiniteGuard(max_consecutive=4)
    with pytest.raises(NonFiniteStepsError, match=r"4 training steps in a row \(from step 3\).*before_nonfinite.ckpt"):
        fit(module, guard, tmp_path, steps=20)
    state = torch.load(tmp_path / "before_nonfinite.ckpt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(state["state_dict"]["layer.weight"], module.weights_seen[3], rtol=0, atol=0)


@pytest.mark.parametrize(("resolution", "keys"), [(30, "model.vae.ch_mult"), (36, "model.network.channel_mult")])
def test_an_image_size_the_models_cannot_divide_is_refused_naming_the_keys(resolution, keys):
    vae = torch.nn.Module()
    vae.downsample_factor = 4
    unet = torch.nn.Module()
    unet.downsample_factor = 4
    with pytest.raises(ValueError, match=rf"data.resolution={resolution}.*{keys}"):
        check_resolution(resolution, vae, unet)
    check_resolution(32, vae, unet)
