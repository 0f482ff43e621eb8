"""LatentDiffusion: frozen parts stay frozen, only the U-Net learns, the loss is deterministic given a generator."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch.utils.data import DataLoader, Dataset

from ldm.config import instantiate_module

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red circle on a white background", "a blue square on a black background"]


def tiny_config(*overrides: str):
    """The demo's composed config, without its VAE file (scale factor 0.5)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=["experiment=demo", "model.latents.vae_weights=null",
                                           "model.latents.scale_factor=0.5", *overrides])


def tiny_module(*overrides: str):
    cfg = tiny_config(*overrides)
    torch.manual_seed(0)
    return instantiate_module(cfg.model)


class CaptionedNoise(Dataset):
    """Random 32x32 images in [-1, 1] with alternating captions."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict:
        image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(index)) * 2 - 1
        return {"image": image, "caption": CAPTIONS[index % 2]}


def train_steps(module, steps: int) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(CaptionedNoise(), batch_size=4))
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_only_the_unet_trains_and_frozen_parts_are_unchanged():
    module = tiny_module("model.ema_decay=0.9")
    vae_before, text_before, unet_before = snapshot(module.vae), snapshot(module.text_encoder), snapshot(module.network)
    trainer = train_steps(module, steps=3)

    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.network.parameters()}
    for frozen in (module.vae, module.text_encoder):
        assert not any(p.requires_grad for p in frozen.parameters())
        assert all(p.grad is None for p in frozen.parameters())
        assert not frozen.training
    for name, value in snapshot(module.vae).items():
        assert torch.equal(value, vae_before[name]), name
    for name, value in snapshot(module.text_encoder).items():
        assert torch.equal(value, text_before[name]), name
    changed = [name for name, value in snapshot(module.network).items() if not torch.equal(value, unet_before[name])]
    assert len(changed) > 0.5 * len(unet_before)
    # The EMA copy moved towards the trained weights but is not them.
    ema, trained = module.ema_network.module.state_dict(), module.network.state_dict()
    assert any(not torch.equal(ema[k], unet_before[k]) for k in ema)
    assert any(not torch.equal(ema[k], trained[k]) for k in ema)


def test_diffusion_loss_is_deterministic_given_a_generator_and_differs_without():
    module = tiny_module()
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = module.conditioning(CAPTIONS * 2)
    assert context.tokens.shape == (4, 16, 64)
    first = module.diffusion_loss(latents, context, generator=torch.Generator().manual_seed(3))
    again = module.diffusion_loss(latents, context, generator=torch.Generator().manual_seed(3))
    other = module.diffusion_loss(latents, context, generator=torch.Generator().manual_seed(4))
    assert first.shape == () and torch.isfinite(first)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_every_prediction_type_and_weighting_gives_a_finite_loss_with_gradients(prediction_type):
    module = tiny_module(f"model.objective.prediction_type={prediction_type}", "model.objective.loss_weighting=min_snr",
                         "model.loss.offset_noise_strength=0.1")
    latents = torch.randn(2, 4, 8, 8)
    loss = module.diffusion_loss(latents, module.conditioning(CAPTIONS))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in module.network.parameters() if p.requires_grad)


def test_encode_images_gives_scaled_latents_without_gradients():
    module = tiny_module()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = module.encode_images(images)
    assert latents.shape == (2, 4, 8, 8)
    assert not latents.requires_grad
    module.latent_options = dataclasses.replace(module.latent_options, sample_posterior=False)
    assert torch.equal(module.encode_images(images), module.vae.encode(images).mode() * 0.5)


def test_fused_adamw_with_bf16_mixed_clips_the_gradient_norm():
    """Lightning refuses to clip for a fused optimizer under mixed precision; without fp16's scaler the module
    clips itself, so the demo's fused AdamW trains in bf16-mixed with its gradient clipping."""
    module = tiny_module("model.optimizer.fused=true", "model.lr_schedule=null")
    norms_at_step: list[float] = []

    class RecordNormOfTheStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # The gradients the optimizer stepped with: the next batch's closure zeroes them.
            grads = [p.grad for p in pl_module.network.parameters() if p.grad is not None]
            norms_at_step.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    clip = 1e-3  # far below the unclipped norm of a fresh U-Net's gradient, so clipping must have acted
    trainer = L.Trainer(accelerator="cpu", max_steps=2, precision="bf16-mixed", gradient_clip_val=clip,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[RecordNormOfTheStep()])
    trainer.fit(module, DataLoader(CaptionedNoise(), batch_size=4))
    assert trainer.optimizers[0].defaults["fused"]
    assert len(norms_at_step) == 2 and all(norm <= clip * 1.01 for norm in norms_at_step)


def test_channels_last_input_gives_the_same_loss():
    """channels_last changes the memory order of the U-Net's input only: the loss is the same number."""
    module = tiny_module()
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = module.conditioning(CAPTIONS * 2)
    plain = module.diffusion_loss(latents, context, generator=torch.Generator().manual_seed(3))
    module.latent_options = dataclasses.replace(module.latent_options, channels_last=True)
    reordered = module.diffusion_loss(latents, context, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(reordered, plain, rtol=1e-5, atol=1e-6)  # convolution kernels may sum in another order
