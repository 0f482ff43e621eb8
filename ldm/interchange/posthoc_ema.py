"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3):
the U-Net of any relative standard deviation ``sigma_rel``, reconstructed from a run's snapshots.

The snapshots are ema-pytorch's files ``{profile}.{step}.pt`` (tensors only, keys under ``ema_model.``) beside
``posthoc_ema.json``, which records the profiles' sigma_rel and gamma; training writes them
(``ldm.training.posthoc_ema.PostHocEMASnapshots``). ``synthesize_state`` combines them by least squares (the
paper's Algorithm 3; ema-pytorch's ``solve_weights``). This reads a foreign file layout into a model's weights,
with neither Lightning nor the training module, so it lives in interchange, which evaluation and the tools import.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from ema_pytorch.post_hoc_ema import sigma_rel_to_gamma, solve_weights
from torch import Tensor

if TYPE_CHECKING:
    from ldm.pipeline import TextToImagePipeline

SNAPSHOT_NAME = re.compile(r"^(\d+)\.(\d+)\.pt$")
PREFIX = "ema_model."
RECORD_NAME = "posthoc_ema.json"


def list_snapshots(snapshot_dir: str | Path) -> tuple[list[float], list[tuple[int, int, Path]]]:
    """The profiles' gammas and every snapshot (profile index, step, file) of a snapshot folder."""
    folder = Path(snapshot_dir)
    record_file = folder / RECORD_NAME
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


def apply_posthoc_ema(pipeline: TextToImagePipeline, snapshots: str | Path, sigma_rel: float,
                      step: int | None = None) -> None:
    """Replace ``pipeline.network``'s weights with the post-hoc EMA of ``sigma_rel`` (snapshot keys must match);
    the pipeline's stored EMA state is dropped."""
    state = pipeline.network.state_dict()
    synthesized = synthesize_state(snapshots, sigma_rel, step)
    unknown = sorted(set(synthesized) - set(state))
    if unknown or not synthesized:
        raise ValueError(f"the snapshots in {snapshots} do not fit this model's U-Net (e.g. {unknown[:3]}); "
                         "give --model from the same run")
    state.update({key: value.to(state[key].dtype) for key, value in synthesized.items()})
    pipeline.network.load_state_dict(state)
    pipeline.ema_state = None
