"""Post-hoc EMA snapshots during training (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", sec. 3).

Training keeps two power-function EMA profiles of the U-Net (ema-pytorch's ``PostHocEMA``, whose
``KarrasEMA`` implements the paper's Algorithm 2) and saves both every ``every_n_steps`` optimizer steps as
ema-pytorch's files ``{profile}.{step}.pt`` (tensors only) beside ``posthoc_ema.json``, which records the
profiles' sigma_rel and gamma. ``ldm.interchange.posthoc_ema`` reconstructs the EMA of any ``sigma_rel``
from them afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from ema_pytorch.post_hoc_ema import KarrasEMA, PostHocEMA
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from ldm.interchange.posthoc_ema import RECORD_NAME

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PostHocEMASnapshots(L.Callback):
    """Tracks ``pl_module.network`` with one power-function EMA per ``sigma_rels`` and writes their snapshots
    to ``output_dir`` every ``every_n_steps`` optimizer steps (rank 0). Off unless listed in the callbacks.

    The EMA state is kept in checkpoints, so a resumed run continues the profiles. Each snapshot costs one
    copy of the U-Net per profile on disk (``dtype``: float32 by default, so a reconstruction is limited
    by the least squares and not by rounding). ``check_sigma_rel``: also track that profile directly and
    write it at the end of training as ``direct_{sigma_rel}.pt``, to measure the reconstruction against.
    """

    def __init__(self, output_dir: str, sigma_rels: tuple[float, ...] = (0.05, 0.1), every_n_steps: int = 100,
                 dtype: str = "float32", check_sigma_rel: float | None = None) -> None:
        if len(sigma_rels) < 2 or len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"callbacks.posthoc_ema.sigma_rels={list(sigma_rels)} must hold at least two different values")
        if not all(0 < s < 0.28 for s in sigma_rels):  # gamma > 0 needs sigma_rel below about 0.28
            raise ValueError(f"callbacks.posthoc_ema.sigma_rels={list(sigma_rels)} must lie in (0, 0.28)")
        if every_n_steps <= 0:
            raise ValueError(f"callbacks.posthoc_ema.every_n_steps={every_n_steps} must be > 0")
        if dtype not in DTYPES:
            raise ValueError(f"callbacks.posthoc_ema.dtype={dtype!r}; choose one of {sorted(DTYPES)}")
        self.output_dir = Path(output_dir)
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.every_n_steps = every_n_steps
        self.dtype = dtype
        self.check_sigma_rel = check_sigma_rel
        self.direct: KarrasEMA | None = None
        self.ema: PostHocEMA | None = None
        self._pending_state: dict[str, Tensor] | None = None
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):  # its profiles would copy the local shards, not the U-Net
            raise ValueError("callbacks.posthoc_ema does not run under trainer=fsdp (it keeps whole copies of the "
                             "U-Net); use trainer=ddp, or the module's own EMA (model.ema_decay)")
        self.ema = PostHocEMA(pl_module.network, sigma_rels=self.sigma_rels, update_every=1,
                              checkpoint_every_num_steps="manual", checkpoint_folder=str(self.output_dir),
                              checkpoint_dtype=DTYPES[self.dtype])
        self.ema.to(pl_module.device)
        if self._pending_state is not None:
            self.ema.load_state_dict(self._pending_state)
            self._pending_state = None
        self._last_step = trainer.global_step
        if self.check_sigma_rel is not None:
            self.direct = KarrasEMA(pl_module.network, sigma_rel=self.check_sigma_rel, update_every=1).to(pl_module.device)
        if trainer.is_global_zero:
            record = {"sigma_rels": list(self.sigma_rels), "gammas": list(self.ema.gammas),
                      "every_n_steps": self.every_n_steps, "dtype": self.dtype}
            (self.output_dir / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Once per optimizer step (not per micro-batch under gradient accumulation; not after a skipped step).
        if self.ema is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        self.ema.update()
        if self.direct is not None:
            self.direct.update()
        if trainer.global_step % self.every_n_steps == 0:
            self._snapshot(trainer)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.direct is not None:
            state = {k: v.detach().cpu() for k, v in self.direct.ema_model.state_dict().items()}
            torch.save({"step": int(self.direct.step), "state_dict": state},
                       self.output_dir / f"direct_{self.check_sigma_rel:g}.pt")

    @rank_zero_only
    def _snapshot(self, trainer: L.Trainer) -> None:
        self.ema.checkpoint()

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "ema" not in state_dict:
            return
        if self.ema is not None:
            self.ema.load_state_dict(state_dict["ema"])
        else:
            self._pending_state = state_dict["ema"]
