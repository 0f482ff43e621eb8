"""callbacks.compile_unet: the U-Net is compiled in place, so training runs compiled and checkpoint keys stay the same."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ldm.training.compile import CompileUNet


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.network = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.network(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_compiled_unet_trains_with_unchanged_state_dict_keys():
    torch._dynamo.reset()
    module = Regression()
    keys_before = list(module.state_dict())
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[CompileUNet(enabled=True)])
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=4))
    assert module.network._compiled_call_impl is not None
    assert list(module.state_dict()) == keys_before  # no "_orig_mod." prefix
    assert trainer.global_step == 3


def test_compile_unet_disabled_leaves_the_module_eager():
    module = Regression()
    CompileUNet(enabled=False).on_fit_start(None, module)
    assert module.network._compiled_call_impl is None
