# %% [markdown]
# # 1. The forward process: how diffusion destroys an image
#
# A diffusion model learns to undo a fixed noising process. This notebook runs that process with
# ldm's own functions (`ldm.diffusion.schedules`, `ldm.diffusion.objectives.q_sample`) on one image
# of the built-in data set and shows:
#
# 1. the image noised at t = 0, 100, ..., 999 under the three schedules ldm ships (linear,
#    scaled-linear, cosine), side by side;
# 2. the curves behind those pictures: alpha-bar (how much signal is left) and the log signal-to-noise ratio;
# 3. that `q_sample`'s one-line closed form gives the same distribution as running the chain of 1,000
#    small noising steps.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from ldm.data.synthetic import render_scene
from ldm.diffusion.objectives import q_sample
from ldm.diffusion.schedules import NoiseSchedule

plt.rcParams.update({"figure.dpi": 72, "font.size": 9})
_ = torch.manual_seed(0)

# %% [markdown]
# ## One image, three schedules
#
# Every schedule defines betas (the variance added at each step) and from them
# `alphas_cumprod[t]` = a_t, the product of (1 - beta) up to t. Noising in one go:
#
# $$x_t = \sqrt{a_t}\,x_0 + \sqrt{1 - a_t}\,\varepsilon, \qquad \varepsilon \sim N(0, I).$$
#
# The image is a scene of the built-in data set, drawn by `render_scene` (pixels scaled to [-1, 1]
# as the training pipeline feeds them). The same noise is used in every panel, so the only
# difference between rows is the schedule.

# %%
image = render_scene("circle", "red", "white", size=0.6, centre=(0.5, 0.5), resolution=48)
x0 = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1
schedules = {name: NoiseSchedule(name) for name in ("linear", "scaled_linear", "cosine")}
timesteps = [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999]
noise = torch.randn(x0.shape)

figure, axes = plt.subplots(len(schedules), len(timesteps), figsize=(len(timesteps) * 0.9, 3.0))
for row, (name, schedule) in enumerate(schedules.items()):
    for column, t in enumerate(timesteps):
        x_t = q_sample(x0, torch.tensor([t]), noise, schedule.alphas_cumprod)
        axes[row, column].imshow(((x_t[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1))
        axes[row, column].set_xticks([]), axes[row, column].set_yticks([])
        axes[0, column].set_title(f"t={t}")
    axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center")
plt.tight_layout()
plt.show()

# %% [markdown]
# The **linear** schedule (DDPM's, designed for pixels) loses the shape first: its last few hundred
# steps train the model on images that are nearly pure noise. **Scaled-linear** (Stable
# Diffusion's) is gentler, and **cosine** keeps the shape visible longest, spreading the destruction
# more evenly over t.
#
# ## The numbers behind the pictures
#
# alpha-bar a_t is the fraction of the image's variance left at step t; log SNR = log(a_t / (1 - a_t))
# is the signal-to-noise ratio that the denoiser faces. `NoiseSchedule` stores both.

# %%
figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
for name, schedule in schedules.items():
    left.plot(schedule.alphas_cumprod, label=name)
    right.plot(schedule.snr.log(), label=name)
left.set(xlabel="t", ylabel="alpha-bar  (signal variance left)", title="alpha-bar")
right.set(xlabel="t", ylabel="log SNR", title="log signal-to-noise ratio")
right.axhline(0, color="gray", lw=0.5)
left.legend()
plt.tight_layout()
plt.show()
for name, schedule in schedules.items():
    half = int((schedule.alphas_cumprod < 0.5).nonzero()[0])
    print(f"{name:14s} signal falls below half at t={half:3d}; log SNR at t=999: {schedule.snr[-1].log():6.2f}")

# %% [markdown]
# Linear and scaled-linear end with some signal left at t = 999 (a log SNR far above cosine's), while
# samplers start from pure noise: a small mismatch that `NoiseSchedule(zero_terminal_snr=True)` removes.
#
# ## The closed form is the chain
#
# The process is defined step by step, x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t, with fresh
# noise at each step. `q_sample` jumps straight to step t. Run the chain for many copies of the
# image and compare the mean and standard deviation of every pixel with the closed form's
# sqrt(a_t) x0 and sqrt(1 - a_t) (on a 16 px copy of the scene, to keep the 1,000 steps quick).

# %%
schedule = schedules["scaled_linear"]
small = render_scene("circle", "red", "white", size=0.6, centre=(0.5, 0.5), resolution=16)
x0 = torch.from_numpy(np.array(small)).permute(2, 0, 1).float()[None] / 127.5 - 1  # 768 values
copies = 1000
x = x0.expand(copies, -1, -1, -1).clone()
checkpoints = {100: None, 500: None, 999: None}
for t in range(schedule.num_train_timesteps):
    beta = schedule.betas[t]
    x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn_like(x)
    if t in checkpoints:
        checkpoints[t] = (x.mean(0), x.std(0))

for t, (mean, std) in checkpoints.items():
    closed = q_sample(x0, torch.tensor([t]), torch.zeros_like(x0), schedule.alphas_cumprod)[0]
    expected_std = (1 - schedule.alphas_cumprod[t]).sqrt()
    # The mean over N copies has a standard error of std / sqrt(N); 5 of them bound every pixel.
    bound = 5 * expected_std / math.sqrt(copies)
    mean_error = (mean - closed).abs().max()
    std_error = (std - expected_std).abs().max()
    print(f"t={t:3d}: max |chain mean - sqrt(a) x0| = {mean_error:.4f} (5 standard errors: {bound:.4f}); "
          f"max |chain std - sqrt(1-a)| = {std_error:.4f} (expected {float(expected_std):.3f})")
    assert mean_error < bound and std_error < bound

# %% [markdown]
# The chain's statistics match the closed form within sampling error at every pixel: training can
# draw any x_t in one step, which is what makes diffusion training cheap (one random t per image,
# no simulation).
#
# ## What you should now know
#
# - The forward process is fixed, not learnt: `q_sample(x0, t, noise, alphas_cumprod)` gives
#   x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, the same distribution as t small noising steps.
# - A schedule is just the curve a_t. Linear destroys a small image early (wasting steps on pure
#   noise), cosine spreads the destruction over all steps; scaled-linear, Stable Diffusion's, lies between.
# - log SNR is the quantity that matters across schedules: the loss weights of notebook 2 and the
#   samplers of notebook 3 are written in terms of it.
