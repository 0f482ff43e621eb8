"""Preemption signal -> checkpoint at the next step, requeue through the previous handler, stop;
throughput callback logs speed and MFU with U-Net FLOPs counted once."""

from __future__ import annotations

import os
import signal
import time

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ldm.training.preemption import CheckpointAndRequeue, stop_signal_exit_status
from ldm.training.throughput import ThroughputMonitor, device_peak_tflops, network_training_flops


class Regression(L.LightningModule):
    """Sends itself ``signal_number`` (SIGUSR1) during the training step of ``signal_at_step`` (``times`` times)."""

    def __init__(self, signal_at_step: int | None = None, signal_number: int = signal.SIGUSR1, times: int = 1) -> None:
        super().__init__()
        self.network = nn.Linear(8, 8)
        self.signal_at_step = signal_at_step
        self.signal_number = signal_number
        self.times = times

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.signal_at_step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signal_number)
        (x,) = batch
        return self.network(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(module, callbacks, tmp_path, steps):
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
                        callbacks=callbacks)
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(256, 8)), batch_size=4))
    return trainer


def test_preemption_signal_checkpoints_requeues_and_stops(tmp_path):
    requeue_calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: requeue_calls.append(signum))  # as submitit's
    try:
        callback = CheckpointAndRequeue(signals=["SIGUSR1"], dirpath=str(tmp_path / "checkpoints"))
        trainer = fit(Regression(signal_at_step=3), [callback], tmp_path, steps=50)
        assert trainer.global_step == 4  # the step under way when the signal came was finished, then training stopped
        state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert state["global_step"] == 4
        assert requeue_calls == [signal.SIGUSR1]  # the previous handler (submitit's requeue) ran once, afterwards
        assert signal.getsignal(signal.SIGUSR1) is not callback._handle  # restored after fit
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_checkpoint_the_current_step_and_stop_without_requeue(tmp_path, name):
    """Without the callback, SIGINT raises KeyboardInterrupt mid-step and Lightning's SIGTERM handling stops
    without a checkpoint: both would lose the steps since the last periodic checkpoint."""
    number = getattr(signal, name)
    before = signal.getsignal(number)
    callback = CheckpointAndRequeue(signals=["SIGUSR1"], dirpath=str(tmp_path / "checkpoints"))
    trainer = fit(Regression(signal_at_step=3, signal_number=number), [callback], tmp_path, steps=50)
    assert trainer.global_step == 4 and not trainer.received_sigterm
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 4
    torch.testing.assert_close(state["state_dict"]["network.weight"], trainer.lightning_module.network.weight,
                               rtol=0, atol=0)
    assert callback.stopped_by == number and stop_signal_exit_status([callback]) == 128 + number
    assert signal.getsignal(number) == before  # restored after fit


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    callback = CheckpointAndRequeue(signals=["SIGUSR1"], dirpath=str(tmp_path / "checkpoints"))
    with pytest.raises(SystemExit):  # Lightning turns the KeyboardInterrupt into exit status 1
        fit(Regression(signal_at_step=3, signal_number=signal.SIGINT, times=2), [callback], tmp_path, steps=50)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    # Lightning's teardown after the interrupt puts the callback's handler back; it now acts as Python's own
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_unet_flops_match_the_closed_form_for_a_linear_layer():
    batch, width_in, width_out = 16, 32, 24
    layer = nn.Linear(width_in, width_out)
    flops = network_training_flops(layer, (torch.randn(batch, width_in),))
    # forward 2*B*I*O; backward: the weight gradient, 2*B*I*O (the input takes no gradient)
    assert flops == 2 * 2 * batch * width_in * width_out
    assert layer.weight.device.type == "cpu" and layer.weight.grad is None  # counted on a meta copy


def test_unet_flops_count_inputs_made_under_bf16_autocast():
    conv = nn.Conv2d(4, 8, 3, padding=1)  # a float32 convolution refuses bf16 inputs, even on the meta device
    flops = network_training_flops(conv, (torch.randn(2, 4, 8, 8),))
    assert flops > 0 and network_training_flops(conv, (torch.randn(2, 4, 8, 8, dtype=torch.bfloat16),)) == flops


def test_throughput_monitor_logs_speed_and_mfu(tmp_path):
    monitor = ThroughputMonitor(window=3, peak_tflops=1.0)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4)  # interrupts windows
    trainer = fit(Regression(), [monitor, checkpoint], tmp_path, steps=12)
    assert monitor.flops_per_batch == 2 * 2 * 4 * 8 * 8  # Linear(8, 8), batch 4
    metrics = trainer.callback_metrics
    assert metrics["perf/network_tflops"] > 0 and metrics["perf/data_wait_ms"] >= 0
    torch.testing.assert_close(metrics["perf/mfu"], metrics["perf/network_tflops"])  # peak 1 TFLOP/s
    assert "perf/images_per_s" in metrics  # no images in this batch: 0


def test_a_device_without_a_data_sheet_gets_a_measured_peak():
    value, source = device_peak_tflops(torch.device("cpu"), torch.float32)  # Lightning's data sheets list GPUs only
    assert value > 0 and source.startswith("measured matmul")
