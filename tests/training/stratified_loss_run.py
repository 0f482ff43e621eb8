"""Helper of test_stratified_loss.py: validate one fixed tiny LatentDiffusion on N CPU ranks (gloo).

python tests/training/stratified_loss_run.py DEVICES BATCH_PER_RANK OUTPUT. Ten keyed validation samples (the loss
keeps the 60% subset their keys choose: 7 of them),
split over ranks in turn; the module is built with seed 0, so every run validates the same weights.
Rank 0 saves the logged ``val/loss_*`` metrics of two validations in a row to OUTPUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, IterableDataset

from ldm.config import instantiate_module
from ldm.ranks import rank_and_world_size

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red circle on a white background", "a blue square on a black background"]
NUM_SAMPLES = 10


class KeyedImages(IterableDataset):
    """Samples 0..9 with keys, split over ranks in turn (rank r: r, r + N, ...)."""

    def __iter__(self):
        rank, world_size = rank_and_world_size()
        for index in range(rank, NUM_SAMPLES, world_size):
            image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(index)) * 2 - 1
            yield {"image": image, "caption": CAPTIONS[index % 2], "key": f"{index:09d}"}


def main(devices: int, batch_per_rank: int, output: str) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "model.latents.vae_weights=null", "model.latents.scale_factor=0.5",
                                                    "model.validation.subset=0.6"])
    torch.manual_seed(0)
    module = instantiate_module(cfg.model)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    loader = DataLoader(KeyedImages(), batch_size=batch_per_rank)
    runs = []
    for _ in range(2):
        trainer.validate(module, loader, verbose=False)
        runs.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/loss_")})
    if trainer.is_global_zero:
        torch.save(runs, output)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
