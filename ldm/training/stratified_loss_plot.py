"""Callback: the per-timestep-bin validation losses of every validation, as a JSON table and a plot in the run folder."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from ldm.atomic import atomic_write

BIN_METRIC = re.compile(r"^val/loss_bin_(\d+)$")


class StratifiedLossPlot(L.Callback):
    """After each validation, appends ``val/loss_bin_k`` (logged by ``LatentDiffusion``) at the global step to
    ``output_dir/val_loss_bins.json`` and redraws ``output_dir/val_loss_bins.png``: one curve per bin over
    training steps (left) and the loss against the bin at each validation (right). Kept in checkpoints,
    so a resumed run continues its curves."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.history: list[dict[str, Any]] = []

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        bins = {int(m.group(1)): float(v) for name, v in trainer.callback_metrics.items() if (m := BIN_METRIC.match(name))}
        if not bins:
            return
        self.history = [row for row in self.history if row["step"] != trainer.global_step]
        self.history.append({"step": int(trainer.global_step), "loss_bins": [bins[k] for k in sorted(bins)],
                             "loss_stratified": float(trainer.callback_metrics["val/loss_stratified"])})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.output_dir / "val_loss_bins.json") as temporary:
            temporary.write_text(json.dumps(self.history, indent=1) + "\n")
        plot_loss_bins(self.history, self.output_dir / "val_loss_bins.png")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def plot_loss_bins(history: list[dict[str, Any]], path: Path) -> Path:
    """Per-bin loss over steps and loss against bin (one line per validation), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (over_steps, over_bins) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    steps = [row["step"] for row in history]
    num_bins = len(history[-1]["loss_bins"])
    for k in range(num_bins):
        over_steps.plot(steps, [row["loss_bins"][k] if k < len(row["loss_bins"]) else None for row in history],
                        "o-", label=f"bin {k}")
    over_steps.plot(steps, [row["loss_stratified"] for row in history], "k--", label="mean")
    over_steps.set_xlabel("step")
    over_steps.set_ylabel("validation loss")
    over_steps.set_yscale("log")
    over_steps.legend(fontsize=6, ncol=2)
    for row in history:
        over_bins.plot(range(len(row["loss_bins"])), row["loss_bins"], "o-", label=f"step {row['step']}")
    over_bins.set_xlabel("timestep bin (0: least noise)")
    over_bins.set_yscale("log")
    over_bins.legend(fontsize=6)
    for axes in (over_steps, over_bins):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
