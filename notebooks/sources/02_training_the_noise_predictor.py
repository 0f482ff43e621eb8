# %% [markdown]
# # 2. Training the noise predictor
#
# Latent diffusion trains one network, the U-Net, to predict the noise that was added to an image's
# latents. This notebook shows, with ldm's own functions:
#
# 1. the training step in a dozen lines (t ~ U, eps ~ N(0, I), x_t = q_sample, MSE(eps, unet(x_t, t, c)))
#    and that it is exactly what `LatentDiffusion.diffusion_loss` computes;
# 2. the three things a model can be trained to predict (eps, v, x0) and the min-SNR loss weights over t;
# 3. a short training run of the demo U-Net on the built-in data, with its loss curve.
#
# The frozen parts (VAE, text encoder) come from `tiny_model.py`, which trains the demo's VAE briefly
# and caches it under `cache_dir`.

# %% tags=["parameters"]
cache_dir = "../models/notebooks"  # where the built-in data and the tiny VAE are written (and reused)
train_steps = 60

# %%
import hydra
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from ldm.diffusion.objectives import loss_weights, q_sample, training_target
from tiny_model import stage2_config, untrained_model

plt.rcParams.update({"figure.dpi": 72, "font.size": 9})
module = untrained_model(cache_dir)  # the demo's LatentDiffusion: trained VAE, frozen text encoder, new U-Net
cfg = stage2_config(cache_dir, "data.batch_size=32")
datamodule = hydra.utils.instantiate(cfg.data)
datamodule.prepare_data(), datamodule.setup("fit")
batches = iter(datamodule.train_dataloader())
batch = next(batches)
print(f"a batch: images {tuple(batch['image'].shape)}, e.g. caption {batch['caption'][0]!r}")

# %% [markdown]
# ## The training step
#
# Images go through the frozen VAE (latents times the scale factor, notebook 4) and captions through
# the frozen text encoder. Then:

# %%
def training_step(unet, latents, cond, alphas_cumprod, generator):
    """The epsilon-prediction loss of one batch: latents (B, 4, 8, 8), the caption's conditioning (tokens (B, L, D))."""
    t = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator)  # t ~ U{0..T-1}
    noise = torch.randn(latents.shape, generator=generator)  # eps ~ N(0, I)
    x_t = q_sample(latents, t, noise, alphas_cumprod)  # the forward process, in one jump
    prediction = unet(x_t, t, cond)  # the U-Net guesses eps from x_t, t and the caption
    return F.mse_loss(prediction, noise)


latents = module.encode_images(batch["image"])
cond = module.conditioning(batch["caption"])
mine = training_step(module.network, latents, cond, module.alphas_cumprod, torch.Generator().manual_seed(0))
module.objective.loss_weighting = "uniform"  # the demo trains with min-SNR weights (below); compare the plain MSE
ldm = module.diffusion_loss(latents, cond, generator=torch.Generator().manual_seed(0))
print(f"these dozen lines: {mine:.6f}   LatentDiffusion.diffusion_loss: {ldm:.6f}")
torch.testing.assert_close(mine, ldm)

# %% [markdown]
# ## What to predict: eps, v or x0
#
# Given x_t, knowing any one of eps, x0 or v = sqrt(a) eps - sqrt(1 - a) x0 gives the others
# (`ldm.diffusion.objectives`). They differ in what the network finds easy: predicting eps at low
# noise is nearly the identity task "return the noise", while x0 at high noise is "draw the mean image".
# v moves from eps (t near 0) to -x0 (t near T). The maps below are channel 0 of one latent.

# %%
times = [50, 500, 950]
noise = torch.randn(latents[:1].shape, generator=torch.Generator().manual_seed(1))
figure, axes = plt.subplots(3, len(times) + 1, figsize=(6, 4.6))
for row, prediction_type in enumerate(("epsilon", "v_prediction", "sample")):
    axes[row, 0].imshow(latents[0, 0], cmap="RdBu"), axes[row, 0].set_ylabel(prediction_type)
    for column, step in enumerate(times, start=1):
        t = torch.tensor([step])
        target = training_target(prediction_type, latents[:1], noise, t, module.alphas_cumprod)
        axes[row, column].imshow(target[0, 0], cmap="RdBu", vmin=-2.5, vmax=2.5)
        axes[0, column].set_title(f"target at t={step}")
axes[0, 0].set_title("x0 (the latent)")
for axis in axes.flat:
    axis.set_xticks([]), axis.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Weighting the timesteps: min-SNR
#
# With plain MSE on eps, the low-noise steps (high SNR) dominate training while contributing little to
# sample quality. Min-SNR-gamma (Hang et al. 2023) caps each step's weight at gamma in x0 units;
# `loss_weights` converts that to a weight on whatever the model predicts. The demo uses gamma = 5.

# %%
t = torch.arange(1000)
figure, axis = plt.subplots(figsize=(6, 3))
for prediction_type in ("epsilon", "v_prediction", "sample"):
    weights = loss_weights("min_snr", t, module.alphas_cumprod, prediction_type, snr_gamma=5.0)
    axis.plot(t, weights, label=f"min_snr, {prediction_type}")
axis.plot(t, loss_weights("uniform", t, module.alphas_cumprod, "epsilon"), "k:", label="uniform")
axis.set(yscale="log", xlabel="t", ylabel="loss weight", title="min-SNR-5 weights (scaled-linear schedule)")
axis.legend()
plt.show()

# %% [markdown]
# For eps prediction the weight is min(SNR, 5) / SNR: 1 at high noise, falling off where SNR > 5,
# i.e. the easy, almost-clean steps count less.
#
# ## A short training run
#
# The same step with min-SNR weights and AdamW, on fresh batches of the built-in data. (The demo
# runs this through Lightning with EMA, warm-up and a cosine learning rate; `tiny_model.py` does that.)

# %%
module.objective.loss_weighting = "min_snr"
module.network.train()
optimizer = torch.optim.AdamW(module.network.parameters(), lr=1e-3)
losses = []
for step in range(train_steps):
    batch = next(batches)
    loss = module.diffusion_loss(module.encode_images(batch["image"]), module.conditioning(batch["caption"]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())

figure, axis = plt.subplots(figsize=(6, 3))
axis.plot(losses, alpha=0.4, label="per step")
window = 10
axis.plot(range(window - 1, len(losses)), torch.tensor(losses).unfold(0, window, 1).mean(1), label=f"mean of {window}")
axis.set(xlabel="step", ylabel="min-SNR weighted MSE", title=f"{train_steps} steps, batch 32")
axis.legend()
plt.show()
print(f"loss: first {window} steps {sum(losses[:window]) / window:.3f}, last {window} {sum(losses[-window:]) / window:.3f}")

# %% [markdown]
# The loss drops fast at first (the network learns the typical noise level and the plain backgrounds),
# then slowly, as it learns which colour and shape each caption asks for; the demo trains for 1,100
# steps, and notebooks 3 and 5 use a model trained for a few hundred.
#
# ## What you should now know
#
# - A training step is: draw t uniformly and noise, jump to x_t with `q_sample`, regress the U-Net's
#   output on the target. No sampling, no chain: every step is independent.
# - The target may be eps, v or x0; they are interchangeable given x_t and t, and the choice changes
#   which timesteps the loss emphasises. `loss_weights` re-balances timesteps (min-SNR-gamma).
# - `LatentDiffusion.diffusion_loss` is these lines, plus weights; the VAE and text encoder stay frozen.
