# %% [markdown]
# # 4. The latent space: why diffusion runs on VAE latents
#
# Stable Diffusion does not denoise pixels. A frozen autoencoder (AutoencoderKL, "the VAE") compresses
# each image into a small grid of latents, the U-Net learns diffusion there, and the decoder turns the
# final latents back into pixels. This notebook shows, on the demo's VAE (f = 4, 4 channels; trained
# briefly by `tiny_model.py`):
#
# 1. an image, its 4 latent channels and its reconstruction;
# 2. the latent scale factor: what it is, how it is measured, and why diffusion needs it;
# 3. what working in latents saves: tensor shapes and U-Net FLOPs, for the demo and for Stable Diffusion 1.x.

# %% tags=["parameters"]
cache_dir = "../models/notebooks"

# %%
import hydra
import matplotlib.pyplot as plt
import torch
from omegaconf import OmegaConf

from ldm.checkpoints import read_metadata
from ldm.data.synthetic import ensure_synthetic_dataset
from ldm.evaluation.reference import read_image_caption_set
from ldm.training.throughput import network_training_flops
from tiny_model import ROOT, trained_vae, untrained_model

plt.rcParams.update({"figure.dpi": 72, "font.size": 9})
module = untrained_model(cache_dir)  # only its VAE is used here
vae = module.vae
_, val_shards = ensure_synthetic_dataset(f"{cache_dir}/data")
images, captions = read_image_caption_set(val_shards, resolution=32, limit=256)  # (N, 3, 32, 32) in [0, 1]

# %% [markdown]
# ## Encode, look, decode
#
# `vae.encode` returns a diagonal Gaussian over latents (mean and log-variance per element); training
# samples from it, here we take its mean. 32x32x3 = 3,072 numbers become 8x8x4 = 256.

# %%
with torch.no_grad():
    posterior = vae.encode(images * 2 - 1)
    latents = posterior.mean  # (N, 4, 8, 8)
    reconstructions = ((vae.decode(latents) + 1) / 2).clamp(0, 1)
print(f"image {tuple(images.shape[1:])} -> latents {tuple(latents.shape[1:])} "
      f"({images[0].numel() / latents[0].numel():.0f}x fewer numbers)")
error = (reconstructions - images).abs().mean()
print(f"mean absolute reconstruction error over {len(images)} images: {error:.4f} (pixel range 0..1)")

shown = 3
figure, axes = plt.subplots(shown, 6, figsize=(7.5, 1.35 * shown))
for row in range(shown):
    axes[row, 0].imshow(images[row].permute(1, 2, 0))
    for channel in range(4):
        axes[row, channel + 1].imshow(latents[row, channel], cmap="RdBu")
        axes[0, channel + 1].set_title(f"latent ch. {channel}")
    axes[row, 5].imshow(reconstructions[row].permute(1, 2, 0))
axes[0, 0].set_title("image"), axes[0, 5].set_title("decoded")
for axis in axes.flat:
    axis.set_xticks([]), axis.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# This VAE trained for only a few minutes' worth of steps: colours and layout survive the round trip,
# edges blur (the demo's 800-step VAE is sharper). The latent channels are still images: spatially
# aligned maps of the scene, one latent per 4x4 pixels. That locality is what lets a convolutional U-Net work on them, and it is why the
# cross-attention maps of notebook 5 can be read as maps over the image.
#
# ## The scale factor
#
# The noise schedule assumes data of roughly unit variance: at step t the signal is sqrt(a_t) x0 and
# the noise sqrt(1 - a_t) eps. If the latents had a std of 3, every step would be much less noisy than
# the schedule says (the log SNR shifted by 2 log 3); a std of 0.3, much noisier. So latents are
# multiplied by `latent_scale_factor` = 1 / std, measured on data when the VAE is trained (stage 1
# writes it into the weights file; Stable Diffusion's VAE uses 0.18215) and divided out before decoding.

# %%
stored = float(read_metadata(trained_vae(cache_dir))["latent_scale_factor"])
samples = posterior.sample(torch.Generator().manual_seed(0))
print(f"std of unscaled latents: {samples.std():.3f}; stored scale factor {stored:.4f} (1/std = {1 / samples.std():.4f})")
scaled = samples * stored
figure, axis = plt.subplots(figsize=(6, 2.6))
axis.hist(samples.flatten(), bins=80, alpha=0.5, density=True, label=f"latents (std {samples.std():.2f})")
axis.hist(scaled.flatten(), bins=80, alpha=0.5, density=True, label=f"x scale factor (std {scaled.std():.2f})")
axis.hist(torch.randn(scaled.numel()), bins=80, histtype="step", density=True, color="k", label="N(0, 1) noise")
axis.set(xlabel="value", title="latent values, before and after scaling")
axis.legend()
plt.show()

# %% [markdown]
# After scaling, the latents and the noise that the forward process mixes in have the same spread,
# so the schedule's SNR at each t is the SNR the model actually sees.
#
# ## What latents save
#
# FLOPs of one training step (forward and backward) of the U-Net, counted by `FlopCounterMode` on a
# meta-device copy (nothing runs): the same architecture on latents, and on pixels (3 input channels,
# f times the side). Stable Diffusion 1.x's U-Net is built on the meta device, so this costs no memory.

# %%
def step_flops(unet_config: dict, channels: int, side: int, context_length: int) -> int:
    """FLOPs of a training step of the U-Net of ``unet_config`` on one (channels, side, side) input."""
    with torch.device("meta"):
        unet = hydra.utils.instantiate({**unet_config, "in_channels": channels, "out_channels": channels})
        inputs = (torch.empty(1, channels, side, side), torch.zeros(1, dtype=torch.long),
                  torch.empty(1, context_length, unet.context_dim))
    return network_training_flops(unet, inputs)


sd1 = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/network/sd1.yaml"))
for name, config, latent_side, factor, length in [("demo, 32 px (f=4)", module.model_config["network"], 8, 4, 16),
                                                  ("SD 1.x, 512 px (f=8)", sd1, 64, 8, 77)]:
    latent = step_flops(config, 4, latent_side, length)
    pixel = step_flops(config, 3, latent_side * factor, length)
    print(f"{name:21s} latents 4x{latent_side}x{latent_side}: {latent / 1e9:8.2f} GFLOP per image;  "
          f"pixels 3x{latent_side * factor}x{latent_side * factor}: {pixel / 1e9:11.1f} GFLOP ({pixel / latent:.0f}x)")

# %% [markdown]
# Convolutions cost f^2 times more on f times the side; self-attention at full resolution grows with
# the square of the number of pixels, which is why the ratio is far larger than f^2 at 512 px. The VAE
# itself runs once per image (and during training it can even run once per data set: see
# `python -m ldm.tools.precompute_latents`).
#
# ## What you should now know
#
# - The VAE maps an image to a small, spatially aligned latent grid (8x8x4 here, 64x64x4 for SD at
#   512 px) and back; how much detail survives depends on how well it was trained.
# - Latents are multiplied by `latent_scale_factor` (1 / their std) so that the noise schedule means
#   what it says; the pipeline divides it out before decoding.
# - Diffusion in latents is orders of magnitude cheaper per step than in pixels, which is the point of
#   *latent* diffusion.
