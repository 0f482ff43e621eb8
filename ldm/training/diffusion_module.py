"""LatentDiffusion: trains a U-Net on the latents of a frozen VAE, conditioned by a frozen text encoder."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ldm.checkpoints import load_weights
from ldm.config_check import build_options, check_number
from ldm.data.latents import precomputed_context, sample_latents
from ldm.diffusion.losses import LossOptions, debiased_weights, huber_delta, per_sample_loss, perturbed_noise
from ldm.diffusion.objectives import offset_noise
from ldm.diffusion.training_objectives import DiscreteDiffusion, Objective, check_objective_configuration
from ldm.diffusion.prior_preservation import prior_preservation_weights
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.stratified import stratified_quantiles
from ldm.interchange.frozen_files import FrozenFileError, describe_file
from ldm.interchange.pretrained import PretrainedWeights, load_pretrained
from ldm.models.conditioner import vector_width
from ldm.pipeline import TextToImagePipeline
from ldm.training.ema import EMAModel
from ldm.training.lora import LoraError, LoraOptions, share_frozen_weights
from ldm.training.lora_module import add_lora_to_module, check_lora_checkpoint, lora_pipeline_parts
from ldm.training.lr_schedules import WarmupSchedule
from ldm.training.skip_logging import SkipCountLogging


class LatentDiffusion(SkipCountLogging, L.LightningModule):
    """Noise-prediction training of ``unet`` in the latent space of a frozen ``vae``.

    Per step: images (B, 3, H, W) in [-1, 1] -> ``vae.encode(...).sample() * latent_scale_factor``
    (B, C, H/f, W/f); captions -> ``text_encoder`` context (B, L, D); t ~ U{0..T-1}; x_t = q_sample;
    loss = weighted MSE(unet(x_t, t, context), target of ``prediction_type``).

    ``latent_scale_factor``: given in the config, else read from the VAE weights file's metadata
    (stage 1 stores the value it measured on the data), else measured as 1/std of the first
    training batch's latents. It is a buffer, so checkpoints keep it.
    The VAE and text encoder are frozen: eval mode, no gradients, not in the optimizer, run under
    ``torch.no_grad()``; weights that come from a file are not written into checkpoints again.

    ``pretrained`` (``PretrainedWeights`` or its fields) starts from released weights (fine-tuning):
    ``path`` an original SD ``.ckpt``/``.safetensors`` or a diffusers folder; U-Net (its EMA copy with ``use_ema``), VAE and, with ``text_encoder``, the text tower are
    loaded before the EMA copy is made. ``vae_weights``, when also given, then replaces the VAE.

    ``objective`` (``model/objective=flow|edm``, a ``training_objectives`` object) replaces discrete
    diffusion, which ``prediction_type``, ``loss_weighting`` and ``snr_gamma`` configure when it is null.
    ``loss`` (``LossOptions``): Huber losses, input perturbation, debiased weighting, timestep bias.
    Validation also logs a stratified loss (``val_loss_bins`` > 0): every validation sample is noised at one
    level in each of ``val_loss_bins`` bins of equal probability under the objective's training levels
    (``ldm.diffusion.stratified``; equal-width bins of t for discrete diffusion), with levels and noise drawn
    from a generator seeded by (``val_loss_seed``, the sample's key), and the latents are the VAE posterior's mode.
    So the value depends on the weights alone: the same at every validation, in every run and on any number
    of processes. Logged as ``val/loss_bin_{k}`` (k = 0 lowest noise) and their mean ``val/loss_stratified``;
    the per-sample loss and weighting are the training loss's (without offset noise or input perturbation). ``val_loss_subset`` < 1 keeps that share of the validation
    samples, chosen by key (so the same samples on any number of processes), to bound the cost of K passes.
    ``lora`` (``LoraOptions`` or its fields, needs ``pretrained``): train peft LoRA adapters instead of the
    U-Net (see ``ldm.training.lora_module``); only adapter weights are trainable, averaged and checkpointed.
    ``prior_loss_weight``: DreamBooth's weight of the class images' loss, for batches that mark them
    (``is_prior``, from ``ldm.data.dreambooth.DreamBoothDataModule``).
    SDXL-class models: a ``text_encoder`` that is a ``TextConditioner`` with micro-conditioning gives the
    U-Net its vector y from the pooled text embedding and the batch's size fields (``original_size``,
    ``crop_coords``, ``target_size``, each (B, 2)); ``size_condition_dropout`` maps each size condition to
    the probability that a training sample has its embedding zeroed (guidance dropout, like captions).
    ``channels_last``: the U-Net's input (so its activations) in channels-last memory order, which oneDNN's CPU
    convolutions run faster (benchmarks/train_step.py); the weights keep their order, so saved files are unchanged.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        noise_schedule: NoiseSchedule,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_schedule: WarmupSchedule | None = None,
        vae_weights: str | None = None,
        latent_scale_factor: float | None = None,
        prediction_type: str = "epsilon",
        loss_weighting: str = "uniform",
        snr_gamma: float = 5.0,
        offset_noise_strength: float = 0.0,
        ema_decay: float | None = 0.9999,
        sample_posterior: bool = True,
        pretrained: PretrainedWeights | Mapping[str, Any] | None = None,
        objective: Objective | None = None,
        loss: LossOptions | None = None,
        val_loss_bins: int = 10,
        val_loss_seed: int = 0,
        val_loss_subset: float = 1.0,
        lora: LoraOptions | Mapping[str, Any] | None = None,
        prior_loss_weight: float = 1.0,
        size_condition_dropout: Mapping[str, float] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        check_optimizer_arguments(optimizer)
        check_numbers(latent_scale_factor, snr_gamma, offset_noise_strength, ema_decay)
        self.pretrained = build_options(PretrainedWeights, pretrained, "model.pretrained")
        self.lora = build_options(LoraOptions, lora, "model.lora")
        check_number("model.prior_loss_weight", prior_loss_weight, minimum=0.0)
        self.prior_loss_weight = prior_loss_weight
        self.size_condition_dropout = check_size_condition_dropout(size_condition_dropout, text_encoder)
        self.channels_last = channels_last
        if self.lora and not self.pretrained:
            raise LoraError("model.lora trains adapters on released weights: set model.pretrained.path (an SD file "
                            "or a diffusers folder, e.g. a run's model/ folder)")
        if self.lora and hasattr(text_encoder, "text_encoders"):
            raise LoraError("model.lora with a text encoder of several towers (SDXL-class, model.text_encoder="
                            "TextConditioner) is not supported: LoRA files here name one text tower")
        if vae_weights and not os.path.isfile(vae_weights):
            raise FileNotFoundError(
                f"model.vae_weights={vae_weights} does not exist: train stage 1 first (for the demo: python train.py "
                f"experiment=demo_vae, or make demo), or set model.vae_weights to an existing VAE weights file")
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.noise_schedule = noise_schedule
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        check_objective_configuration(objective or DiscreteDiffusion(prediction_type), noise_schedule.zero_terminal_snr,
                                      prediction_type, loss_weighting)
        self.objective = objective or DiscreteDiffusion(prediction_type, loss_weighting, snr_gamma)
        self.prediction_type = self.objective.prediction_type
        self.loss_weighting = loss_weighting
        self.snr_gamma = snr_gamma
        self.loss_options = loss or LossOptions()
        if self.loss_options.debiased and loss_weighting != "uniform":
            raise ValueError(f"model.loss.debiased=true replaces the objective's weighting; "
                             f"model.loss_weighting={loss_weighting} would be ignored: set it to uniform")
        self.offset_noise_strength = offset_noise_strength
        self.sample_posterior = sample_posterior
        self.vae_weights = vae_weights
        if val_loss_bins < 0 or val_loss_bins > noise_schedule.num_train_timesteps:
            raise ValueError(f"model.val_loss_bins={val_loss_bins} must lie in [0, "
                             f"{noise_schedule.num_train_timesteps}] (0 turns the stratified validation loss off)")
        self.val_loss_bins = val_loss_bins
        self.val_loss_seed = val_loss_seed
        check_number("model.val_loss_subset", val_loss_subset, minimum=0.0, strict_minimum=True, maximum=1.0)
        self.val_loss_subset = val_loss_subset
        self.model_config: dict[str, Any] | None = None  # set by ldm.training.build for checkpoints
        check_model_compatibility(unet, vae, text_encoder)

        stored_scale = self._load_pretrained() if self.pretrained else None
        if vae_weights:
            metadata = load_weights(vae, vae_weights)
            stored_scale = float(metadata["latent_scale_factor"]) if "latent_scale_factor" in metadata else None
        scale = latent_scale_factor if latent_scale_factor is not None else stored_scale
        self.register_buffer("latent_scale_factor", torch.tensor(float(scale) if scale else float("nan")))
        self.register_buffer("alphas_cumprod", noise_schedule.alphas_cumprod.clone().float(), persistent=False)
        for frozen in (self.vae, self.text_encoder):
            frozen.eval()
            frozen.requires_grad_(False)
        if self.lora:
            add_lora_to_module(self)
        self.ema_unet = EMAModel(unet, decay=ema_decay) if ema_decay else None
        if self.lora and self.ema_unet is not None:
            share_frozen_weights(self.ema_unet.module, unet)
        self.frozen_files = self._describe_frozen_files()

    def _describe_frozen_files(self) -> dict[str, dict[str, Any]]:
        """What checkpoints record of each file whose weights they leave out (path, size, sha256)."""
        records = {}
        if self.vae_weights:
            records["vae_weights"] = describe_file(self.vae_weights)
        if self.pretrained:
            records["pretrained"] = {**describe_file(self.pretrained.path), "use_ema": self.pretrained.use_ema,
                                     "text_encoder": self.pretrained.text_encoder}
        return records

    def _load_pretrained(self) -> float | None:
        """Load the released weights that ``pretrained`` names; returns their latent scale factor, if known."""
        loaded = load_pretrained(self.unet, self.vae, self.text_encoder if self.pretrained.text_encoder else None,
                                 self.pretrained.path, use_ema=self.pretrained.use_ema)
        return loaded["latent_scale_factor"]

    def setup(self, stage: str) -> None:
        """Check the data's image size against the VAE and U-Net before the first step."""
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        resolution = getattr(datamodule, "resolution", None)
        if resolution is not None:
            check_resolution(resolution, self.vae, self.unet)
        check_size_fields(self.text_encoder, datamodule)
        for index, bucket in enumerate(getattr(datamodule, "buckets", None) or []):
            for side in bucket:
                check_resolution(side, self.vae, self.unet, key=f"data.buckets[{index}]={list(bucket)}")

    # ----------------------------------------------------------------------------------- training
    def train(self, mode: bool = True) -> "LatentDiffusion":
        """Train mode for the U-Net only: frozen parts stay in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        if self.ema_unet is not None:
            self.ema_unet.eval()
        return self

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f)."""
        posterior = self.vae.encode(images)
        latents = posterior.sample() if self.sample_posterior else posterior.mode()
        return self.scale_latents(latents)

    def scale_latents(self, latents: Tensor) -> Tensor:
        """Unscaled latents (B, C, h, w) -> times ``latent_scale_factor`` (measured here if unknown)."""
        if torch.isnan(self.latent_scale_factor):
            self._measure_latent_scale_factor(latents)
        return latents * self.latent_scale_factor

    def batch_latents(self, batch: dict[str, Any]) -> Tensor:
        """Scaled latents (B, C, h, w): drawn from a precomputed posterior (``data=latents`` batches
        carry ``latent_mean``/``latent_std``, no VAE call), else the VAE encoding of ``batch["image"]``."""
        if "latent_mean" in batch:
            return self.scale_latents(sample_latents(batch["latent_mean"], batch["latent_std"], self.sample_posterior))
        return self.encode_images(batch["image"])

    def batch_context(self, batch: dict[str, Any]) -> Tensor:
        """Context (B, L, D): precomputed ``text_states`` when the batch has them, else the text encoder's."""
        if "text_states" in batch:
            return precomputed_context(batch["text_states"], batch["caption"], self.encode_captions)
        return self.encode_captions(batch["caption"])

    def batch_conditioning(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """(context (B, L, D), the U-Net's vector y (B, adm_dim) or None): for an SDXL-class conditioner, y is
        the pooled embedding (precomputed ``text_pooled`` or encoded) and the batch's size fields, each
        condition dropped with its ``size_condition_dropout`` probability in training."""
        if not vector_width(self.text_encoder):
            return self.batch_context(batch), None
        conditioner = self.text_encoder
        missing = [name for name in conditioner.size_conditions if name not in batch]
        if missing:
            raise KeyError(f"model.text_encoder.size_conditions={list(conditioner.size_conditions)} but the batches "
                           f"lack {missing}: micro-conditioning needs bucketed data (data.buckets) whose batches "
                           f"carry them, or size_conditions=[]")
        if "text_states" in batch:
            context = precomputed_context(batch["text_states"], batch["caption"], self.encode_captions)
            pooled = None
            if conditioner.pooled_dim:
                if "text_pooled" not in batch:
                    raise KeyError("the precomputed latents have text states but no pooled embedding (text_pooled): "
                                   "precompute them again with this model.text_encoder")
                pooled = precomputed_context(batch["text_pooled"], batch["caption"],
                                             lambda captions: conditioner.encode(captions)[1])
        else:
            context, pooled = conditioner.encode(batch["caption"])
        keep = None
        if self.training and self.size_condition_dropout:
            size = context.shape[0]
            keep = {name: torch.rand(size, device=context.device) >= self.size_condition_dropout.get(name, 0.0)
                    for name in conditioner.size_conditions}
        return context, conditioner.vector(pooled, batch, keep)

    def _measure_latent_scale_factor(self, latents: Tensor) -> None:
        """Set the scale factor to 1/std of these latents, averaged over ranks so all agree."""
        std = latents.float().std()
        std = self.all_gather(std).float().mean() if self.trainer is not None else std
        self.latent_scale_factor.fill_(1.0 / float(std))
        self.print(f"latent_scale_factor measured on the first batch: {float(self.latent_scale_factor):.5f}")

    def encode_captions(self, captions: Sequence[str]) -> Tensor:
        """Captions -> context (B, L, D) from the frozen text encoder (with gradients to its LoRA adapters only
        when ``model.lora.text_encoder`` trains them)."""
        trains_text = bool(self.lora and self.lora.text_encoder and self.training)
        with torch.set_grad_enabled(trains_text and torch.is_grad_enabled()):
            return self.text_encoder(list(captions))

    def diffusion_loss(self, latents: Tensor, context: Tensor, generator: torch.Generator | None = None,
                       sample_weights: Tensor | None = None, vector: Tensor | None = None) -> Tensor:
        """The objective's weighted loss (MSE by default) between the U-Net's output and its target, at noise
        levels drawn by the objective: the mean over the batch, or with ``sample_weights`` (B,) the weighted sum.
        latents: (B, C, h, w); context: (B, L, D); vector: the U-Net's y (B, adm_dim) of an SDXL-class model."""
        options = self.loss_options
        levels = self.objective.sample_levels(latents.shape[0], self.noise_schedule.num_train_timesteps, generator,
                                              latents.device, options.timestep_bias_range,
                                              options.timestep_bias_probability)
        if self.offset_noise_strength > 0:
            noise = offset_noise(latents.shape, self.offset_noise_strength, generator=generator,
                                 device=latents.device, dtype=latents.dtype)
        else:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        input_noise = perturbed_noise(noise, options.input_perturbation, generator) if options.input_perturbation else noise
        losses = self.weighted_losses(latents, context, levels, noise, input_noise, vector)
        return (losses * sample_weights).sum() if sample_weights is not None else losses.mean()

    def weighted_losses(self, latents: Tensor, context: Tensor, levels: Tensor, noise: Tensor,
                        input_noise: Tensor, vector: Tensor | None = None) -> Tensor:
        """Per-sample weighted losses (B,) at the objective's noise ``levels`` (B,); noise, input_noise like latents."""
        options = self.loss_options
        batch = self.objective.noised_batch(latents, noise, input_noise, levels, self.alphas_cumprod)
        vector_argument = () if vector is None else (vector,)
        model_input = batch.model_input
        if self.channels_last:
            model_input = model_input.contiguous(memory_format=torch.channels_last)
        prediction = self.unet(model_input, batch.timesteps, context, *vector_argument)
        delta = None
        if options.loss_type != "mse":
            delta = huber_delta(options.huber_schedule, options.huber_delta, batch.snr, batch.noise_fraction)
        per_sample = per_sample_loss(prediction, batch.target, options.loss_type, delta)
        weights = debiased_weights(batch.snr, batch.x0_error_scale) if options.debiased else batch.weights
        return weights * per_sample

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        latents = self.batch_latents(batch)
        context, vector = self.batch_conditioning(batch)
        sample_weights = None
        if "is_prior" in batch:
            sample_weights = prior_preservation_weights(batch["is_prior"], self.prior_loss_weight)
        loss = self.diffusion_loss(latents, context, sample_weights=sample_weights, vector=vector)
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        self.log_skip_counts(batch)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows each optimizer step (not each micro-batch under gradient accumulation), and
        # before callbacks' on_train_batch_end, so a checkpoint written at this step includes it.
        super().optimizer_step(*args, **kwargs)
        if self.ema_unet is not None:
            self.ema_unet.update_parameters(self.unet)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Loss at timesteps and noise fixed by the batch index, so values compare across validations."""
        generator = torch.Generator(self.device).manual_seed(10_000 + batch_idx)
        latents = self.batch_latents(batch)
        context, vector = self.batch_conditioning(batch)
        loss = self.diffusion_loss(latents, context, generator=generator, vector=vector)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=latents.shape[0])
        if self.val_loss_bins:
            self._accumulate_stratified_loss(batch, batch_idx, context, vector)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_bin_sums = torch.zeros(self.val_loss_bins, dtype=torch.float64, device=self.device)
        self._val_bin_counts = torch.zeros(self.val_loss_bins, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def _accumulate_stratified_loss(self, batch: dict[str, Any], batch_idx: int, context: Tensor,
                                    vector: Tensor | None = None) -> None:
        """Add this batch's per-sample losses at one timestep of each bin to the running per-bin sums."""
        size = len(batch["caption"])
        keys = batch.get("key") or [f"batch{batch_idx}-{i}" for i in range(size)]
        seeds = [sample_seed(self.val_loss_seed, key) for key in keys]
        kept = [i for i, seed in enumerate(seeds) if seed < self.val_loss_subset * 2**60]
        if not kept:
            return
        if "latent_mean" in batch:
            latents = self.scale_latents(batch["latent_mean"][kept])
        else:
            latents = self.scale_latents(self.vae.encode(batch["image"][kept]).mode())
        context = context[kept]
        vector = None if vector is None else vector[kept]
        generators = [torch.Generator().manual_seed(seeds[i]) for i in kept]
        num_timesteps = self.noise_schedule.num_train_timesteps
        # (B, K) quantiles and (B, K, C, h, w) noise, drawn on the CPU so every device sees the same numbers.
        u = torch.stack([stratified_quantiles(g, self.val_loss_bins) for g in generators]).to(self.device)
        noise = torch.stack([torch.randn((self.val_loss_bins, *latents.shape[1:]), generator=g) for g in generators])
        noise = noise.to(self.device, latents.dtype)
        for k in range(self.val_loss_bins):
            levels = self.objective.levels_from_quantiles(u[:, k], num_timesteps)
            losses = self.weighted_losses(latents, context, levels, noise[:, k], noise[:, k], vector)
            self._val_bin_sums[k] += losses.double().sum()
            self._val_bin_counts[k] += latents.shape[0]

    def on_validation_epoch_end(self) -> None:
        if not self.val_loss_bins or self.trainer is None:
            return
        # Sums over every rank's samples, then one division: the value does not depend on how samples were split.
        sums = self.trainer.strategy.reduce(self._val_bin_sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(self._val_bin_counts, reduce_op="sum")
        if not bool((counts > 0).all()):
            return
        per_bin = sums / counts
        for k, value in enumerate(per_bin.tolist()):
            self.log(f"val/loss_bin_{k}", value, sync_dist=True)  # equal on every rank: the mean keeps it
        self.log("val/loss_stratified", float(per_bin.mean()), sync_dist=True)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for optimizers that unscale inside step() (fused
        # AdamW), because of fp16's gradient scaler. Without a scaler (bf16-mixed, 32-true) the gradients are
        # already true values, so clipping them here is what Lightning would do; with a scaler it still refuses.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False):
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [*self.unet.parameters(), *(self.text_encoder.parameters() if self.lora else ())]
        optimizer = self.optimizer_factory(params=[p for p in trainable if p.requires_grad])
        config: dict[str, Any] = {"optimizer": optimizer}
        if self.lr_schedule is not None:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule)
            config["lr_scheduler"] = {"scheduler": scheduler, "interval": "step"}
        return config

    # -------------------------------------------------------------------------------- generation
    def pipeline(self, use_ema: bool = True, unet: nn.Module | None = None) -> TextToImagePipeline:
        """The text-to-image pipeline over this module's (EMA) U-Net, VAE and text encoder.

        ``unet``: a U-Net to use instead (the whole weights gathered from FSDP shards: ``fsdp.whole_pipeline``)."""
        if torch.isnan(self.latent_scale_factor):
            raise RuntimeError("latent_scale_factor is not known yet: train a step or set model.latent_scale_factor")
        given = unet is not None
        if not given:
            unet = self.ema_unet.module if (use_ema and self.ema_unet is not None) else self.unet
        ema_state = self.ema_unet.module.state_dict() if (not use_ema and self.ema_unet is not None and not given) else None
        text_encoder = self.text_encoder
        if self.lora and not given:  # the plain model with the adapters merged in: what export and other tools expect
            unet, text_encoder, ema_state = lora_pipeline_parts(self, use_ema)
        components = ("unet", "vae", "text_encoder", "noise_schedule")
        return TextToImagePipeline(
            unet=unet,
            vae=self.vae,
            text_encoder=text_encoder,
            alphas_cumprod=self.alphas_cumprod,
            latent_scale_factor=float(self.latent_scale_factor),
            prediction_type=self.prediction_type,
            sampler_options=self.objective.sampler_options(),
            model_config={name: self.model_config[name] for name in components} if self.model_config else None,
            ema_state=ema_state,
        )

    # ------------------------------------------------------------------------------- checkpoints
    def _weights_from_files(self) -> list[str]:
        """Prefixes of submodules whose weights come from a fixed file, so checkpoints skip them."""
        prefixes = ["vae."] if (self.vae_weights or self.pretrained) else []
        return prefixes + (["text_encoder."] if self.pretrained and self.pretrained.text_encoder else [])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A LoRA run keeps only its adapters: the base U-Net is the model.pretrained file's.
        prefixes = tuple(self._weights_from_files()) + (("unet.", "ema_unet.module.") if self.lora else ())
        if prefixes:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith(prefixes) or (self.lora and ".lora_" in k)}
        if self.lora:
            checkpoint["ldm_lora"] = dataclasses.asdict(self.lora)
        checkpoint["ldm_model_config"] = self.model_config
        checkpoint["ldm_frozen_files"] = self.frozen_files

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen weights left out of the checkpoint were loaded from their file in __init__: it must be the
        # file the checkpoint was trained with.
        for name, record in checkpoint.get("ldm_frozen_files", {}).items():
            current = self.frozen_files.get(name)
            if current is not None and current["sha256"] != record["sha256"]:
                option = "model.vae_weights" if name == "vae_weights" else "model.pretrained.path"
                raise FrozenFileError(f"{option}={current['path']} has sha256 {current['sha256']}, but the checkpoint "
                                      f"was trained with {record['path']} of sha256 {record['sha256']}")
        own = self.state_dict()
        if self.lora or "ldm_lora" in checkpoint:
            check_lora_checkpoint(checkpoint, own, self.lora)
        prefixes = tuple(self._weights_from_files()) + (("unet.", "ema_unet.module.") if self.lora else ())
        for key, value in own.items():
            if key.startswith(prefixes):
                checkpoint["state_dict"].setdefault(key, value)


def sample_seed(seed: int, key: str) -> int:
    """A seed in [0, 2**60) from (``seed``, a sample's key): the same sample gets the same noise in every run and process."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)


def check_optimizer_arguments(optimizer: Callable[..., torch.optim.Optimizer]) -> None:
    """Check the numbers bound into the optimizer partial (``model.optimizer``) before torch sees them:
    ``lr`` finite and > 0; ``weight_decay``, ``eps``, ``momentum`` finite and >= 0; ``betas`` in [0, 1)."""
    keywords = getattr(optimizer, "keywords", None) or {}
    if "lr" in keywords:
        check_number("model.optimizer.lr", keywords["lr"], minimum=0.0, strict_minimum=True)
    for name in ("weight_decay", "eps", "momentum"):
        if name in keywords:
            check_number(f"model.optimizer.{name}", keywords[name], minimum=0.0)
    if "betas" in keywords:
        betas = keywords["betas"]
        if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
            raise ValueError(f"model.optimizer.betas={betas!r} must be two numbers, e.g. [0.9, 0.999]")
        for index, beta in enumerate(betas):
            check_number(f"model.optimizer.betas[{index}]", beta, minimum=0.0)
            if beta >= 1:
                raise ValueError(f"model.optimizer.betas[{index}]={beta} must be < 1")


def check_numbers(latent_scale_factor: float | None, snr_gamma: float, offset_noise_strength: float,
                  ema_decay: float | None) -> None:
    """Range checks of ``LatentDiffusion``'s numeric arguments, each error naming its ``model.`` key."""
    if latent_scale_factor is not None:
        check_number("model.latent_scale_factor", latent_scale_factor, minimum=0.0, strict_minimum=True)
    check_number("model.snr_gamma", snr_gamma, minimum=0.0, strict_minimum=True)
    check_number("model.offset_noise_strength", offset_noise_strength, minimum=0.0)
    if ema_decay is not None:
        check_number("model.ema_decay", ema_decay, minimum=0.0, maximum=1.0)


def check_model_compatibility(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> None:
    """Catch at start-up the mismatches that would otherwise fail deep inside the first step."""
    unet_in = getattr(unet, "in_channels", None)
    vae_latent = getattr(vae, "embed_dim", None)
    if unet_in is not None and vae_latent is not None and unet_in != vae_latent:
        raise ValueError(
            f"model.unet.in_channels={unet_in} but the VAE has {vae_latent} latent channels; "
            f"set model.unet.in_channels={vae_latent} (and out_channels) or choose another VAE"
        )
    context_dim = getattr(unet, "context_dim", None)
    text_dim = getattr(text_encoder, "output_dim", None)
    if context_dim is not None and text_dim is not None and context_dim != text_dim:
        towers = getattr(text_encoder, "output_dims", None)
        source = f"the text towers output {' + '.join(map(str, towers))} = {text_dim}" if towers else \
            f"the text encoder outputs {text_dim}"
        raise ValueError(
            f"model.unet.context_dim={context_dim} but {source}-dim tokens; "
            f"set model.unet.context_dim={text_dim} or choose another text_encoder"
        )
    adm_in_channels = getattr(unet, "adm_in_channels", None)
    vector_dim = vector_width(text_encoder)
    if (adm_in_channels or 0) != vector_dim:
        if vector_dim:
            parts = (f"{text_encoder.pooled_dim} pooled + {len(text_encoder.size_conditions)} x 2 x "
                     f"{text_encoder.size_embedding_dim} size embeddings")
            given = f"the text encoder's vector is {vector_dim}-dim ({parts})"
        else:
            given = "the text encoder gives no vector (a single tower without micro-conditioning)"
        raise ValueError(f"model.unet.adm_in_channels={adm_in_channels} but {given}; set "
                         f"model.unet.adm_in_channels={vector_dim or 'null'} or choose another text_encoder")


def check_size_fields(text_encoder: nn.Module, datamodule: Any) -> None:
    """Micro-conditioning needs batches that carry the size fields: those of a data module with buckets
    (``data.buckets``, null for square images: ``ldm.data.datamodule``), which every batch gives them."""
    conditions = list(getattr(text_encoder, "size_conditions", ()))
    if conditions and datamodule is not None and not hasattr(datamodule, "buckets"):
        raise ValueError(f"model.text_encoder.size_conditions={conditions} (micro-conditioning) needs batches with "
                         f"those size fields, which {type(datamodule).__name__} does not give: use a data module "
                         f"with data.buckets (null for square images) or set model.text_encoder.size_conditions=[]")


def check_size_condition_dropout(dropout: Mapping[str, float] | None, text_encoder: nn.Module) -> dict[str, float]:
    """``model.size_condition_dropout`` as a dict, each probability in [0, 1] and each name a size condition
    of the text encoder (``model.text_encoder.size_conditions``)."""
    if not dropout:
        return {}
    conditions = tuple(getattr(text_encoder, "size_conditions", ()))
    for name, probability in dropout.items():
        if name not in conditions:
            raise ValueError(f"model.size_condition_dropout.{name}: the text encoder embeds no such size condition "
                             f"(model.text_encoder.size_conditions={list(conditions)})")
        check_number(f"model.size_condition_dropout.{name}", probability, minimum=0.0, maximum=1.0)
    return {name: float(probability) for name, probability in dropout.items()}


def check_resolution(resolution: int, vae: nn.Module, unet: nn.Module, key: str | None = None) -> None:
    """Images of ``resolution`` px (a side) must give latents that the VAE and the U-Net both divide evenly.
    ``key``: what the error names (default ``data.resolution=<resolution>``), e.g. a bucket of ``data.buckets``."""
    vae_factor = int(getattr(vae, "downsample_factor", 1))
    unet_factor = int(getattr(unet, "downsample_factor", 1))
    name = key or f"data.resolution={resolution}"
    fix = "its sides" if key else "data.resolution"
    if resolution % vae_factor:
        raise ValueError(
            f"{name}: {resolution} px is not divisible by the VAE's downsampling factor {vae_factor} "
            f"(2 ** (len(model.vae.ch_mult) - 1)); set {fix} to a multiple of {vae_factor}"
        )
    if (resolution // vae_factor) % unet_factor:
        step = vae_factor * unet_factor
        raise ValueError(
            f"{name}: {resolution} px gives {resolution // vae_factor}-px latents, not divisible by the "
            f"U-Net's downsampling factor {unet_factor} (2 ** (len(model.unet.channel_mult) - 1)); "
            f"set {fix} to a multiple of {step}"
        )
