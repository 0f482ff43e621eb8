"""Stage 1: train an AutoencoderKL on images with a reconstruction loss and a small KL penalty."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ldm.atomic import refuse_existing
from ldm.checkpoints import save_weights
from ldm.training.lr_schedules import WarmupSchedule
from ldm.training.skip_logging import SkipCountLogging


class AutoencoderModule(SkipCountLogging, L.LightningModule):
    """KL-regularised autoencoder training.

    loss = rec + kl_weight * KL, with rec = per-image sum over pixels of |x - x̂| + mse_weight·(x - x̂)²
    and KL the posterior's divergence from N(0, I) summed over latent elements, both averaged over
    the batch: the reductions of the original SD VAE objective (which adds LPIPS and a patch GAN
    that this small-image setting does not need), so ``kl_weight`` has its usual meaning (1e-6).

    At the end of fit, rank 0 writes the VAE weights to ``export_path`` as safetensors, with the
    latent scale factor 1/std(latents) measured on the validation images in its metadata. An existing file
    there is refused when the run starts, unless ``overwrite`` (``overwrite=true``).
    """

    def __init__(
        self,
        vae: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_schedule: WarmupSchedule | None = None,
        kl_weight: float = 1e-6,
        mse_weight: float = 1.0,
        export_path: str | None = None,
        scale_factor_samples: int = 512,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        if export_path:  # refused at start-up, not after training: checkpoints recorded against it hold its hash
            refuse_existing(export_path, "overwrite=true", overwrite)
        self.vae = vae
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.kl_weight = kl_weight
        self.mse_weight = mse_weight
        self.export_path = export_path
        self.scale_factor_samples = scale_factor_samples
        self.model_config: dict[str, Any] | None = None

    def autoencoder_loss(self, images: Tensor) -> dict[str, Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> {"loss", "rec", "kl", "l1_per_pixel"} scalars."""
        reconstruction, posterior = self.vae(images)
        error = (images - reconstruction).float()
        per_image = error.abs() + self.mse_weight * error.square()
        rec = per_image.sum(dim=(1, 2, 3)).mean()
        kl = posterior.kl().mean()
        return {"loss": rec + self.kl_weight * kl, "rec": rec, "kl": kl, "l1_per_pixel": error.abs().mean()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.autoencoder_loss(batch["image"])
        batch_size = batch["image"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        self.log("train/l1_per_pixel", losses["l1_per_pixel"], prog_bar=True, batch_size=batch_size)
        self.log("train/kl", losses["kl"], batch_size=batch_size)
        self.log_skip_counts(batch)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.autoencoder_loss(batch["image"])
        batch_size = batch["image"].shape[0]
        self.log("val/loss", losses["loss"], prog_bar=True, sync_dist=True, batch_size=batch_size)
        self.log("val/l1_per_pixel", losses["l1_per_pixel"], sync_dist=True, batch_size=batch_size)
        return losses["loss"]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.vae.parameters())
        config: dict[str, Any] = {"optimizer": optimizer}
        if self.lr_schedule is not None:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule)
            config["lr_scheduler"] = {"scheduler": scheduler, "interval": "step"}
        return config

    @torch.no_grad()
    def measure_latent_scale_factor(self, dataloader) -> float:
        """1 / std of posterior samples over up to ``scale_factor_samples`` images of ``dataloader``."""
        was_training = self.vae.training
        self.vae.eval()
        latents, seen = [], 0
        for batch in dataloader:
            images = batch["image"].to(self.device)
            latents.append(self.vae.encode(images).sample().float().flatten())
            seen += images.shape[0]
            if seen >= self.scale_factor_samples:
                break
        self.vae.train(was_training)
        if not latents:
            raise RuntimeError("no validation images to measure the latent scale factor on; set data.val_shards")
        return float(1.0 / torch.cat(latents).std())

    def on_fit_end(self) -> None:
        if not self.export_path or not self.trainer.is_global_zero:
            return
        scale = self.measure_latent_scale_factor(self.trainer.datamodule.val_dataloader())
        metadata = {"latent_scale_factor": f"{scale:.6f}", "model_config": self.model_config or {}}
        path = save_weights(self.vae, Path(self.export_path), metadata=metadata)
        self.print(f"VAE weights written to {path} (latent_scale_factor={scale:.5f})")
