"""Helper of test_gradient_equivalence.py: two SGD steps of the tiny LatentDiffusion, on N CPU ranks.

python tests/training/ddp_equivalence_run.py DEVICES BATCH_PER_RANK OUTPUT. The noise and timestep of
each sample are fixed by its index, so any split of the same samples over ranks sees the same inputs.
Rank 0 saves the U-Net's weights before and after the steps to OUTPUT.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, IterableDataset

from ldm.config import instantiate_module
from ldm.diffusion.objectives import q_sample
from ldm.ranks import rank_and_world_size

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red circle on a white background", "a blue square on a black background"]


class IndexedImages(IterableDataset):
    """Samples 0, 1, 2, ... split over ranks in turn (rank r: r, r + N, ...), read when iterated."""

    def __iter__(self):
        rank, world_size = rank_and_world_size()
        for index in range(rank, 64, world_size):
            image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(index)) * 2 - 1
            yield {"image": image, "caption": CAPTIONS[index % 2], "index": index}


def per_sample_noise_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
    latents = self.encode_images(batch["image"])
    context = self.conditioning(batch["caption"])
    generators = [torch.Generator().manual_seed(1000 + int(i)) for i in batch["index"]]
    t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in generators])
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
    prediction = self.network(q_sample(latents, t, noise, self.alphas_cumprod), t, context)
    return F.mse_loss(prediction, noise)


def main(devices: int, batch_per_rank: int, output: str) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=demo", "model.latents.vae_weights=null", "model.latents.scale_factor=0.5", "model.lr_schedule=null",
            "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.5", "~model.optimizer.betas",
            "~model.optimizer.fused", "model.optimizer.weight_decay=0.0", "model.latents.sample_posterior=false"])
    torch.manual_seed(0)
    module = instantiate_module(cfg.model)
    module.training_step = types.MethodType(per_sample_noise_step, module)
    before = {k: v.detach().clone() for k, v in module.network.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=2,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module, DataLoader(IndexedImages(), batch_size=batch_per_rank))
    if trainer.is_global_zero:
        after = {k: v.detach().clone() for k, v in module.network.state_dict().items()}
        torch.save({"before": before, "after": after}, output)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
