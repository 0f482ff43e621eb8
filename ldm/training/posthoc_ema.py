"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3).

Training keeps two power-function EMA profiles of the U-Net (ema-pytorch's ``PostHocEMA``, whose
``KarrasEMA`` implements the paper's Algorithm 2) and saves both every ``every_n_steps`` optimizer steps;
``synthesize_state`` reconstructs the EMA of any relative standard deviation ``sigma_rel`` afterwards as
the least-squares combination of those snapshots (the paper's Algorithm 3; ema-pytorch's ``solve_weights``).
Snapshots are ema-pytorch's files ``{profile}.{step}.pt`` (tensors only) beside ``posthoc_ema.json``,
which records the profiles' sigma_rel and gamma.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from ema_pytorch.post_hoc_ema import KarrasEMA, PostHocEMA, sigma_rel_to_gamma, solve_weights
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

SNAPSHOT_NAME = re.compile(r"^(\d+)\.(\d+)\.pt$")
PREFIX = "ema_model."
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
            (self.output_dir / "posthoc_ema.json").write_text(json.dumps(record, indent=1) + "\n")

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


def list_snapshots(snapshot_dir: str | Path) -> tuple[list[float], list[tuple[int, int, Path]]]:
    """The profiles' gammas and every snapshot (profile index, step, file) of a snapshot folder."""
    folder = Path(snapshot_dir)
    record_file = folder / "posthoc_ema.json"
    if not record_file.is_file():
        raise FileNotFoundError(f"{record_file} does not exist: --snapshots must be the folder that "
                                "callbacks.posthoc_ema.output_dir wrote (train with callbacks=diffusion_posthoc_ema)")
    gammas = [float(g) for g in json.loads(record_file.read_text())["gammas"]]
    snapshots = sorted((int(m.group(1)), int(m.group(2)), path) for path in folder.iterdir()
                       if (m := SNAPSHOT_NAME.match(path.name)))
    return gammas, snapshots


def snapshot_weights(gammas: list[float], snapshots: list[tuple[int, int, Path]], sigma_rel: float,
                     step: int) -> Tensor:
    """Least-squares weights (S,) float64 that combine the snapshots into the EMA of ``sigma_rel`` at ``step``."""
    t_i = torch.tensor([s for _, s, _ in snapshots], dtype=torch.float64)
    gamma_i = torch.tensor([gammas[p] for p, _, _ in snapshots], dtype=torch.float64)
    t_r = torch.tensor([float(step)], dtype=torch.float64)
    gamma_r = torch.tensor([sigma_rel_to_gamma(sigma_rel)], dtype=torch.float64)
    return solve_weights(t_i, gamma_i, t_r, gamma_r).squeeze(-1)


def synthesize_state(snapshot_dir: str | Path, sigma_rel: float, step: int | None = None) -> dict[str, Tensor]:
    """The U-Net state dict (float32) of the EMA with relative standard deviation ``sigma_rel`` at ``step``
    (default: the last snapshot's), from the snapshots taken at or before ``step``."""
    if not 0 < sigma_rel < 0.28:
        raise ValueError(f"sigma_rel={sigma_rel} must lie in (0, 0.28) (a power-function EMA needs gamma > 0)")
    gammas, snapshots = list_snapshots(snapshot_dir)
    if not snapshots:
        raise FileNotFoundError(f"{snapshot_dir} holds no snapshots ({{profile}}.{{step}}.pt); train longer than "
                                "callbacks.posthoc_ema.every_n_steps")
    last = max(s for _, s, _ in snapshots)
    step = last if step is None else step
    snapshots = [snapshot for snapshot in snapshots if snapshot[1] <= step]
    if len(snapshots) < 2:
        raise ValueError(f"step={step}: fewer than two snapshots in {snapshot_dir} were taken by then")
    weights = snapshot_weights(gammas, snapshots, sigma_rel, step)
    total: dict[str, Tensor] = {}
    for weight, (_, _, path) in zip(weights.tolist(), snapshots):
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key, value in state.items():
            if key.startswith(PREFIX) and value.is_floating_point():
                name = key[len(PREFIX):]
                total[name] = total.get(name, 0) + value.double() * weight
    return {key: value.float() for key, value in total.items()}


def apply_posthoc_ema(pipeline, snapshots: str | Path, sigma_rel: float, step: int | None = None) -> None:
    """Replace ``pipeline.network``'s weights with the post-hoc EMA of ``sigma_rel`` (snapshot keys must match)."""
    state = pipeline.network.state_dict()
    synthesized = synthesize_state(snapshots, sigma_rel, step)
    unknown = sorted(set(synthesized) - set(state))
    if unknown or not synthesized:
        raise ValueError(f"the snapshots in {snapshots} do not fit this model's U-Net (e.g. {unknown[:3]}); "
                         "give --model from the same run")
    state.update({key: value.to(state[key].dtype) for key, value in synthesized.items()})
    pipeline.network.load_state_dict(state)
    pipeline.ema_state = None
