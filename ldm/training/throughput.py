"""Training throughput: images/s, latents/s, the network's TFLOP/s and MFU, and time spent waiting for data.

FLOPs are counted with Lightning's ``measure_flops``, and a GPU's peak comes from Lightning's data sheets
(``get_available_flops``).
"""

from __future__ import annotations

import copy
import itertools
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops
from torch import nn

from ldm.conditioning import Conditioning


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (no memory, same shapes)."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    clone = copy.deepcopy(module, memo)
    for submodule in clone.modules():
        submodule._compiled_call_impl = None  # a compiled forward would call the original module
    return clone


def network_training_flops(network: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> int:
    """FLOPs of one forward and backward pass of ``network`` on inputs shaped like ``args``/``kwargs``
    (tensors, or a ``Conditioning`` of them).

    Counted by Lightning's ``measure_flops`` (torch's FlopCounterMode) on a meta-device copy, so nothing runs
    and no memory is taken. Matmuls and convolutions count 2 FLOPs per multiply-add; the backward
    is counted as traced (about 2x the forward). Gradient checkpointing's recomputation is not
    counted (``use_checkpoint`` is off on the copy), as model FLOPs utilisation requires.
    """
    model = meta_copy(network).train()
    for submodule in model.modules():
        if hasattr(submodule, "use_checkpoint"):
            submodule.use_checkpoint = False

    parameter_dtype = next(model.parameters()).dtype

    def to_meta(value: Any) -> Any:
        if isinstance(value, Conditioning):
            return value.map(to_meta)
        if not isinstance(value, torch.Tensor):
            return value
        # Inputs made under autocast (bf16-mixed) are bf16 while the copy's weights are not; the count
        # does not depend on the dtype, so floating inputs take the weights' dtype.
        dtype = parameter_dtype if value.is_floating_point() else value.dtype
        return torch.empty_like(value, device="meta", dtype=dtype, requires_grad=False)

    meta_args = tuple(to_meta(a) for a in args)
    meta_kwargs = {k: to_meta(v) for k, v in (kwargs or {}).items()}
    return measure_flops(model, lambda: model(*meta_args, **meta_kwargs), lambda output: output.float().square().mean())


def measured_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 0.3) -> float:
    """Dense matmul TFLOP/s reached on ``device`` in ``dtype``: the reference for MFU where no peak is given."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    _synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.type != "cpu" and count % 16 == 0:
            _synchronize(device)
    _synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e12


def device_peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The device's dense peak TFLOP/s in ``dtype`` and where it came from: Lightning's data sheet for a
    known GPU, else a matmul measured here (``measured_peak_tflops``; CPUs have no data sheet)."""
    available = get_available_flops(device, dtype)
    if available:
        return available / 1e12, f"data sheet, {dtype}"
    return measured_peak_tflops(device, dtype), f"measured matmul, {dtype}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_dtype(precision: str | int | None) -> torch.dtype:
    """The matmul dtype of a Lightning precision setting ('bf16-mixed' -> bfloat16, '32-true' -> float32...)."""
    text = str(precision)
    if text.startswith("bf16"):
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    if text.startswith("64"):
        return torch.float64
    return torch.float32


def batch_images_and_latents(batch: Any) -> tuple[int, int]:
    """(images, latents) in a training batch: pixel images (``batch["image"]``, each encoded to one latent)
    or precomputed latents (``batch["latent_mean"]``, each the encoding of one image); (0, 0) for others."""
    if isinstance(batch, dict):
        for key in ("latent_mean", "image"):
            if key in batch:
                count = int(batch[key].shape[0])
                return count, count
    return 0, 0


# Lightning's ThroughputMonitor callback logs samples/s and MFU under its own metric names, from a
# ``flops_per_batch`` the module must provide, and refuses batches without samples; it does not time the wait
# for data, restarts its timing around validation but not around checkpoint writes, and knows no CPU peak.
# This callback adds those, on Lightning's FLOP counter and data-sheet peaks.
class ThroughputMonitor(L.Callback):
    """Logs training speed every ``window`` optimizer steps, averaged over the window.

    ``perf/images_per_s`` and ``perf/latents_per_s`` (all ranks; images count pixel images and
    precomputed latents alike, latents what the network trains on, see ``batch_images_and_latents``),
    ``perf/network_tflops`` (per device, model FLOPs of the network's forward and backward), ``perf/mfu``
    (that over ``peak_tflops``) and ``perf/data_wait_ms`` (per batch: from the end of one batch to the
    start of the next, the time the loop waits for the dataloader). A window that validation or a
    checkpoint write interrupts starts again after it. ``peak_tflops``: the device's dense peak in the
    training precision; None takes it from Lightning's data sheets for known GPUs (e.g. 989 for an H100
    SXM in bf16), else measures a matmul on the device at the start (CPUs).
    """

    def __init__(self, window: int = 10, peak_tflops: float | None = None) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        self.window = window
        self.peak_tflops = peak_tflops
        self.flops_per_batch: int | None = None
        self._hook: Any = None
        self._network_inputs: tuple[tuple, dict] | None = None
        self._network_meta: nn.Module | None = None
        self._last_batch_end: float | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self._window_start: float | None = None
        self._images = self._latents = self._batches = self._steps = 0
        self._data_wait = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Copied before the strategy wraps the model: FSDP's sharded parameters have no full shape.
        network = getattr(pl_module, "network", None)
        if stage == "fit" and network is not None and self.flops_per_batch is None:
            self._network_meta = meta_copy(network)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_tflops is None:
            self.peak_tflops, source = device_peak_tflops(pl_module.device, precision_dtype(trainer.precision))
            pl_module.print(f"ThroughputMonitor: peak {self.peak_tflops:.3f} TFLOP/s on {pl_module.device} ({source}); "
                            f"set callbacks.throughput.peak_tflops to override it")
        network = getattr(pl_module, "network", None)
        if network is not None and self._network_meta is not None:
            def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
                self._network_inputs = (args, kwargs)
                self._hook.remove()

            self._hook = network.register_forward_pre_hook(capture, with_kwargs=True)

    def _interrupt(self) -> None:
        """Validation or a checkpoint write runs between batches: restart the window after it, so that
        neither counts as training time or data wait."""
        self._reset_window()
        self._last_batch_end = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._interrupt()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._interrupt()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._window_start is None:
            _synchronize(pl_module.device)
            self._window_start = time.perf_counter()
        elif self._last_batch_end is not None:
            self._data_wait += now - self._last_batch_end
        images, latents = batch_images_and_latents(batch)
        self._images += images
        self._latents += latents
        self._batches += 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.flops_per_batch is None and self._network_inputs is not None:
            args, kwargs = self._network_inputs
            self.flops_per_batch = network_training_flops(self._network_meta, args, kwargs)
            self._network_inputs = self._network_meta = None
        self._last_batch_end = time.perf_counter()
        if self._window_start is None:  # interrupted during this batch's hooks (a checkpoint write)
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._steps += 1
        if self._steps < self.window:
            return
        _synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._window_start
        metrics = {
            "perf/images_per_s": self._images * trainer.world_size / elapsed,
            "perf/latents_per_s": self._latents * trainer.world_size / elapsed,
            "perf/data_wait_ms": 1000 * self._data_wait / max(1, self._batches - 1),
        }
        if self.flops_per_batch is not None:
            tflops = self.flops_per_batch * self._batches / elapsed / 1e12
            metrics["perf/network_tflops"] = tflops
            if self.peak_tflops:
                metrics["perf/mfu"] = tflops / self.peak_tflops
        pl_module.log_dict(metrics, batch_size=1)
        self._reset_window()
        self._window_start = time.perf_counter()
