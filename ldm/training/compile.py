"""torch.compile of the U-Net as a training option (a callback, so model code stays as it is)."""

from __future__ import annotations

from typing import Any

import lightning as L


class CompileUNet(L.Callback):
    """Compiles ``pl_module.network`` in place (``nn.Module.compile``) when training starts.

    In place, so parameter names and checkpoints are unchanged (no ``_orig_mod.`` prefix), and after
    the strategy has wrapped the model (DDP, FSDP units), as torch recommends. ``enabled=False``
    leaves the U-Net eager; ``mode`` and ``dynamic`` are ``torch.compile``'s.
    """

    def __init__(self, enabled: bool = False, mode: str | None = None, dynamic: bool | None = False,
                 fullgraph: bool = False) -> None:
        self.enabled = enabled
        self.options: dict[str, Any] = {"mode": mode, "dynamic": dynamic, "fullgraph": fullgraph}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        network = getattr(pl_module, "network", None)
        if network is None:
            raise ValueError(f"callbacks.compile_unet.enabled=true but {type(pl_module).__name__} has no .network")
        network.compile(**self.options)
