"""Post-hoc EMA: snapshots of two power-function profiles reconstruct a directly tracked EMA of another sigma_rel."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from ema_pytorch.post_hoc_ema import KarrasEMA
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ldm.interchange.posthoc_ema import synthesize_state
from ldm.training.posthoc_ema import PostHocEMASnapshots

# A noisy regression: SGD keeps the weights wandering, so EMAs of different lengths differ clearly.
STEPS, EVERY, SIGMA_REL = 400, 10, 0.08


class NoisyRegression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.network = nn.Linear(16, 16)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.network(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.network.parameters(), lr=0.2)


class DirectEMA(L.Callback):
    """The EMA of SIGMA_REL tracked at every optimizer step, as the snapshots' profiles are."""

    def on_fit_start(self, trainer, pl_module):
        self.ema = KarrasEMA(pl_module.network, sigma_rel=SIGMA_REL, update_every=1)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.ema.update()


def fit(tmp_path, callbacks):
    torch.manual_seed(0)
    x = torch.randn(STEPS * 4, 16)
    y = x @ torch.randn(16, 16) + torch.randn(STEPS * 4, 16)
    module = NoisyRegression()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    return module


def test_reconstructed_sigma_rel_matches_the_directly_tracked_ema(tmp_path):
    direct = DirectEMA()
    module = fit(tmp_path, [PostHocEMASnapshots(str(tmp_path / "ema"), sigma_rels=(0.05, 0.1), every_n_steps=EVERY),
                            direct])
    assert len(list((tmp_path / "ema").glob("*.pt"))) == 2 * STEPS // EVERY
    tracked = {k: v for k, v in direct.ema.ema_model.state_dict().items()}
    synthesized = synthesize_state(tmp_path / "ema", SIGMA_REL)
    raw = module.network.state_dict()
    error = max(float((synthesized[k] - tracked[k]).norm() / tracked[k].norm()) for k in tracked)
    spread = max(float((raw[k] - tracked[k]).norm() / tracked[k].norm()) for k in tracked)
    # Reconstruction error well below how far the EMA is from the raw weights (what averaging changes).
    print(f"reconstruction error {error:.2e}, EMA vs raw {spread:.2e}")
    assert error < 0.02 and error < spread / 5, (error, spread)
    # and the other profiles' reconstructions differ from it by more than that error
    other = synthesize_state(tmp_path / "ema", 0.2)
    assert max(float((other[k] - tracked[k]).norm() / tracked[k].norm()) for k in tracked) > 2 * error


def test_a_missing_snapshot_folder_and_bad_sigma_rel_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="posthoc_ema.json"):
        synthesize_state(tmp_path, 0.1)
    with pytest.raises(ValueError, match="sigma_rel=0.3"):
        synthesize_state(tmp_path, 0.3)
    with pytest.raises(ValueError, match="sigma_rels"):
        PostHocEMASnapshots(str(tmp_path), sigma_rels=(0.1,))


def test_a_resumed_run_continues_the_profiles_exactly(tmp_path):
    """40 steps, checkpoint, resume to 80 (from a tensors-only load): the snapshots at step 80 equal an
    uninterrupted run's."""
    torch.manual_seed(0)
    x = torch.randn(160, 16)
    y = x @ torch.randn(16, 16) + torch.randn(160, 16)

    def run(folder, max_steps, ckpt_path=None):
        torch.manual_seed(1)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(folder),
                            callbacks=[PostHocEMASnapshots(str(folder / "ema"), sigma_rels=(0.05, 0.1), every_n_steps=40)])
        # One full batch per epoch: every step sees the same data, wherever a resumed run restarts its epoch.
        trainer.fit(NoisyRegression(), DataLoader(TensorDataset(x, y), batch_size=160), ckpt_path=ckpt_path,
                    weights_only=True)
        return trainer

    run(tmp_path / "straight", 80)
    first = run(tmp_path / "resumed", 40)
    checkpoint = first.checkpoint_callback.best_model_path
    run(tmp_path / "resumed", 80, ckpt_path=checkpoint)
    for profile in (0, 1):
        straight = torch.load(tmp_path / "straight" / "ema" / f"{profile}.80.pt", weights_only=True)
        resumed = torch.load(tmp_path / "resumed" / "ema" / f"{profile}.80.pt", weights_only=True)
        for key, value in straight.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_posthoc_ema_refuses_fsdp_at_fit_start(tmp_path):
    """Under FSDP the module holds shards, which the profiles would copy as if they were the U-Net."""
    from types import SimpleNamespace

    from ldm.training.fsdp import UNetFSDPStrategy

    callback = PostHocEMASnapshots(output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="posthoc_ema does not run under trainer=fsdp"):
        callback.on_fit_start(SimpleNamespace(strategy=UNetFSDPStrategy()), None)
