"""LatentDiffusion: trains a denoising network on the latents of a frozen VAE, conditioned by frozen text towers.
It wires parts and runs the step; docs/architecture.md shows the parts and their contracts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ldm.checkpoints import check_resumable
from ldm.conditioning import Conditioning
from ldm.config_check import build_options, check_number
from ldm.data.latents import sample_latents
from ldm.diffusion.losses import LossOptions
from ldm.diffusion.prior_preservation import prior_preservation_weights
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.training_objectives import DiscreteDiffusion, Objective, check_objective_configuration
from ldm.interchange.checkpoint_versions import FORMAT, FORMAT_KEY, upgrade_checkpoint
from ldm.pipeline import TextToImagePipeline
from ldm.training import denoising_loss, frozen_weights
from ldm.training.ema import EMAModel
from ldm.training.full_training import FullTraining
from ldm.training.latent_options import LatentOptions
from ldm.training.lora_training import LoraTraining
from ldm.training.lr_schedules import WarmupSchedule
from ldm.training.module_checks import (check_datamodule, check_model_compatibility, check_optimizer_arguments,
                                        clip_fused_optimizer_gradients)
from ldm.training.skip_logging import SkipCountLogging
from ldm.training.stratified_validation import StratifiedValidationLoss

PIPELINE_COMPONENTS = ("network", "vae", "text_encoder", "noise_schedule")


class LatentDiffusion(SkipCountLogging, L.LightningModule):
    """Trains ``network`` (``network(x_t, t, cond) -> prediction``) in the latent space of a frozen ``vae``.

    Per step: images (B, 3, H, W) in [-1, 1] -> ``vae.encode(...).sample() * latent_scale_factor`` (B, C, H/f,
    W/f) (or a precomputed posterior); captions and batch -> ``text_encoder.condition`` -> Conditioning; the
    ``objective`` draws noise levels and builds x_t and the target; the ``mode`` (full, LoRA) says what trains.
    ``latent_scale_factor`` (``latents.scale_factor``, else the VAE file's metadata, else 1/std of the first
    batch's latents) is a buffer kept by checkpoints. Frozen VAE and text towers; ``ema_decay``: None, no EMA.
    """

    def __init__(
        self,
        network: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        noise_schedule: NoiseSchedule,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_schedule: WarmupSchedule | None = None,
        objective: Objective | None = None,
        loss: LossOptions | None = None,
        mode: FullTraining | LoraTraining | None = None,
        latents: LatentOptions | Mapping[str, Any] | None = None,
        ema_decay: float | None = 0.9999,
        validation: StratifiedValidationLoss | None = None,
    ) -> None:
        super().__init__()
        check_optimizer_arguments(optimizer)
        if ema_decay is not None:
            check_number("model.ema_decay", ema_decay, minimum=0.0, maximum=1.0)
        self.mode = mode or FullTraining()
        self.mode.check_text_encoder(text_encoder)
        self.latent_options = build_options(LatentOptions, latents, "model.latents") or LatentOptions()
        frozen_weights.check_vae_weights_exist(self.latent_options.vae_weights)
        self.network = network
        self.vae = vae
        self.text_encoder = text_encoder
        self.noise_schedule = noise_schedule
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.objective = objective or DiscreteDiffusion()
        check_objective_configuration(self.objective, noise_schedule.zero_terminal_snr)
        self.loss_options = loss or LossOptions()
        if self.loss_options.debiased and getattr(self.objective, "loss_weighting", "uniform") != "uniform":
            raise ValueError(f"model.loss.debiased=true replaces the objective's weighting; model.objective."
                             f"loss_weighting={self.objective.loss_weighting} would be ignored: set it to uniform")
        self.validation = validation or StratifiedValidationLoss()
        self.validation.check(noise_schedule.num_train_timesteps)
        self.model_config: dict[str, Any] | None = None  # set by ldm.config.instantiate_module for checkpoints
        check_model_compatibility(network, vae, text_encoder)

        vae_weights, pretrained = self.latent_options.vae_weights, self.mode.pretrained
        stored_scale = frozen_weights.load_frozen_weights(network, vae, text_encoder, vae_weights, pretrained)
        scale = self.latent_options.scale_factor if self.latent_options.scale_factor is not None else stored_scale
        self.register_buffer("latent_scale_factor", torch.tensor(float(scale) if scale else float("nan")))
        self.register_buffer("alphas_cumprod", noise_schedule.alphas_cumprod.clone().float(), persistent=False)
        for frozen in (self.vae, self.text_encoder):
            frozen.eval()
            frozen.requires_grad_(False)
        self.mode.prepare(self)
        self.ema_network = EMAModel(network, decay=ema_decay) if ema_decay else None
        self.mode.prepare_ema(self)
        self.frozen_files = frozen_weights.describe_frozen_files(vae_weights, pretrained)

    def setup(self, stage: str) -> None:
        """Check the data's image sizes against the VAE and network before the first step."""
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if datamodule is not None:
            check_datamodule(datamodule, self.vae, self.network, self.text_encoder)

    def train(self, mode: bool = True) -> "LatentDiffusion":
        """Train mode for the network only: frozen parts stay in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        if self.ema_network is not None:
            self.ema_network.eval()
        return self

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f)."""
        posterior = self.vae.encode(images)
        return self.scale_latents(posterior.sample() if self.latent_options.sample_posterior else posterior.mode())

    def scale_latents(self, latents: Tensor) -> Tensor:
        """Unscaled latents (B, C, h, w) -> times ``latent_scale_factor`` (measured here if unknown: 1/std of
        these latents, averaged over ranks so all agree)."""
        if torch.isnan(self.latent_scale_factor):
            std = latents.float().std()
            std = self.all_gather(std).float().mean() if self.trainer is not None else std
            self.latent_scale_factor.fill_(1.0 / float(std))
            self.print(f"latent_scale_factor measured on the first batch: {float(self.latent_scale_factor):.5f}")
        return latents * self.latent_scale_factor

    def batch_latents(self, batch: dict[str, Any]) -> Tensor:
        """Scaled latents (B, C, h, w): drawn from a precomputed posterior (``data=latents`` batches carry
        ``latent_mean``/``latent_std``, no VAE call), else the VAE encoding of ``batch["image"]``."""
        if "latent_mean" in batch:
            drawn = sample_latents(batch["latent_mean"], batch["latent_std"], self.latent_options.sample_posterior)
            return self.scale_latents(drawn)
        return self.encode_images(batch["image"])

    def conditioning(self, captions: Sequence[str], batch: Mapping[str, Any] | None = None) -> Conditioning:
        """The conditioner's Conditioning of ``captions`` (and the batch's precomputed states and size fields),
        with gradients to text-tower adapters only when the training mode trains them."""
        trains_text = self.mode.trains_text_encoder and self.training
        with torch.set_grad_enabled(trains_text and torch.is_grad_enabled()):
            return self.text_encoder.condition(list(captions), batch or {}, train=self.training)

    def batch_conditioning(self, batch: dict[str, Any]) -> Conditioning:
        return self.conditioning(batch["caption"], batch)

    def diffusion_loss(self, latents: Tensor, cond: Conditioning, generator: torch.Generator | None = None,
                       sample_weights: Tensor | None = None) -> Tensor:
        """The training loss of latents (B, C, h, w) under ``cond`` (``denoising_loss.diffusion_loss``)."""
        return denoising_loss.diffusion_loss(
            self.network, self.objective, self.loss_options, self.alphas_cumprod,
            self.noise_schedule.num_train_timesteps, latents, cond, generator, sample_weights,
            self.latent_options.channels_last)

    def weighted_losses(self, latents: Tensor, cond: Conditioning, levels: Tensor, noise: Tensor,
                        input_noise: Tensor) -> Tensor:
        """Per-sample weighted losses (B,) at noise ``levels`` (B,) (``denoising_loss.weighted_losses``)."""
        return denoising_loss.weighted_losses(self.network, self.objective, self.loss_options, self.alphas_cumprod,
                                              latents, cond, levels, noise, input_noise,
                                              self.latent_options.channels_last)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        latents = self.batch_latents(batch)
        cond = self.batch_conditioning(batch)
        sample_weights = None
        if "is_prior" in batch:  # DreamBooth's batches mark the class images
            sample_weights = prior_preservation_weights(batch["is_prior"], self.loss_options.prior_loss_weight)
        loss = self.diffusion_loss(latents, cond, sample_weights=sample_weights)
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        self.log_skip_counts(batch)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows each optimizer step (not each micro-batch under gradient accumulation), and
        # before callbacks' on_train_batch_end, so a checkpoint written at this step includes it.
        super().optimizer_step(*args, **kwargs)
        if self.ema_network is not None:
            self.ema_network.update_parameters(self.network)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Loss at levels and noise fixed by the batch index, so values compare across validations."""
        generator = torch.Generator(self.device).manual_seed(10_000 + batch_idx)
        latents = self.batch_latents(batch)
        cond = self.batch_conditioning(batch)
        loss = self.diffusion_loss(latents, cond, generator=generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=latents.shape[0])
        if self.validation.bins:
            self.validation.accumulate(self, batch, batch_idx, cond)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.validation.start(self.device)

    def on_validation_epoch_end(self) -> None:
        self.validation.finish(self)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if not clip_fused_optimizer_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.mode.trainable_parameters(self))
        config: dict[str, Any] = {"optimizer": optimizer}
        if self.lr_schedule is not None:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule)
            config["lr_scheduler"] = {"scheduler": scheduler, "interval": "step"}
        return config

    def pipeline(self, use_ema: bool = True, network: nn.Module | None = None) -> TextToImagePipeline:
        """The text-to-image pipeline over this module's (EMA) network, VAE and text encoder; ``network``: one to use
        instead (the whole weights gathered from FSDP shards: ``fsdp.whole_pipeline``)."""
        if torch.isnan(self.latent_scale_factor):
            raise RuntimeError("latent_scale_factor is not known yet: train a step or set model.latents.scale_factor")
        if network is None:
            network, text_encoder, ema_state = self.mode.pipeline_parts(self, use_ema)
        else:
            text_encoder, ema_state = self.text_encoder, None
        return TextToImagePipeline(
            network=network, vae=self.vae, text_encoder=text_encoder, alphas_cumprod=self.alphas_cumprod,
            latent_scale_factor=float(self.latent_scale_factor), prediction_type=self.objective.prediction_type,
            sampler_options=self.objective.sampler_options(),
            model_config={name: self.model_config[name] for name in PIPELINE_COMPONENTS} if self.model_config else None,
            ema_state=ema_state,
        )

    def _prefixes_left_out(self) -> tuple[str, ...]:
        return frozen_weights.prefixes_from_files(self.latent_options.vae_weights, self.mode.pretrained) \
            + self.mode.prefixes_left_out()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = self._prefixes_left_out()
        if prefixes:  # adapters (".lora_") stay: a LoRA run's base network is the pretrained file's
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith(prefixes) or ".lora_" in k}
        self.mode.on_save_checkpoint(checkpoint)
        checkpoint.update({"ldm_model_config": self.model_config, "ldm_frozen_files": self.frozen_files, FORMAT_KEY: FORMAT})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_checkpoint(checkpoint)  # a checkpoint of an earlier ldm names its parts as that version did
        frozen_weights.check_frozen_files(checkpoint.get("ldm_frozen_files", {}), self.frozen_files)
        own = self.state_dict()
        self.mode.on_load_checkpoint(checkpoint, own)
        check_resumable(checkpoint, own, self.model_config, self.trainer.ckpt_path if self._trainer is not None else None)
        prefixes = self._prefixes_left_out()
        for key, value in own.items():  # weights left out of the file are the ones loaded from their files
            if key.startswith(prefixes):
                checkpoint["state_dict"].setdefault(key, value)
