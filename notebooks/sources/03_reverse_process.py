# %% [markdown]
# # 3. The reverse process: from noise to an image
#
# Generation runs the forward process of notebook 1 backwards: start from pure noise in latent space
# and let the trained U-Net remove a little of it at each step. This notebook uses the demo model
# (trained briefly by `tiny_model.py`, cached under `cache_dir`) and ldm's samplers to show:
#
# 1. a sample and the model's estimate of the final image (x0) every few steps, as a strip and a GIF;
# 2. DDPM, DDIM, Euler and DPM-Solver++ side by side at the same number of U-Net evaluations;
# 3. what the classifier-free guidance scale does.

# %% tags=["parameters"]
cache_dir = "../models/notebooks"
num_inference_steps = 20

# %%
import io

import matplotlib.pyplot as plt
import torch
from IPython.display import Image, display

from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.samplers import sample_ddim
from ldm.evaluation.prompt_adherence import adherence_rates
from ldm.visualization import captioned_grid, to_pil_images
from tiny_model import tiny_model

plt.rcParams.update({"figure.dpi": 72, "font.size": 9})
module = tiny_model(cache_dir)
pipe = module.pipeline()  # the EMA U-Net, the VAE and the text encoder: ldm's one text-to-image path

# %% [markdown]
# ## Watching one sample
#
# DDIM with the guided denoiser (`classifier_free_guidance` wraps the U-Net), recording after every
# step the current latent x_t and the x0 the model predicts from it. Both are decoded by the VAE.

# %%
prompt = "a red circle on a white background"
cond = module.conditioning([prompt])
denoise = classifier_free_guidance(pipe.network, cond, module.conditioning([""]), guidance_scale=2.0)
noise = pipe.initial_noise([0], 32, 32)
steps = []
sample_ddim(denoise, noise, module.alphas_cumprod, num_inference_steps,
            callback=lambda i, x, x0: steps.append((x.clone(), x0.clone())))


def decode(latents):
    return ((module.vae.decode(latents / pipe.latent_scale_factor) + 1) / 2).clamp(0, 1)


with torch.no_grad():
    x_t = decode(torch.cat([noise] + [x for x, _ in steps]))
    x0 = decode(torch.cat([x0 for _, x0 in steps]))
shown = list(range(0, num_inference_steps, max(1, num_inference_steps // 6))) + [num_inference_steps - 1]
figure, axes = plt.subplots(2, len(shown), figsize=(len(shown) * 1.1, 2.6))
for column, step in enumerate(shown):
    axes[0, column].imshow(x_t[step + 1].permute(1, 2, 0)), axes[0, column].set_title(f"after step {step + 1}")
    axes[1, column].imshow(x0[step].permute(1, 2, 0))
axes[0, 0].set_ylabel("x_t"), axes[1, 0].set_ylabel("x0 estimate")
for axis in axes.flat:
    axis.set_xticks([]), axis.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# The x0 estimate settles early (the colour and background after a few steps, the outline later);
# the remaining steps sharpen it while x_t sheds its noise. The same, animated (left x_t, right x0):

# %%
frames = []
for x, estimate in zip(to_pil_images(x_t[1:]), to_pil_images(x0)):
    frame = captioned_grid([x, estimate], ["x_t", "x0 estimate"], columns=2, tile_size=64, caption_lines=1)
    frames.append(frame.convert("P"))
buffer = io.BytesIO()
frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:] + [frames[-1]] * 5, duration=150, loop=0)
display(Image(data=buffer.getvalue(), format="gif"))
print(f"GIF: {len(frames)} frames, {len(buffer.getvalue()) / 1024:.0f} KiB")

# %% [markdown]
# ## Four samplers at equal cost
#
# Every sampler takes the same `denoise(x, t)` callable and calls it once per step, so at equal steps
# they cost the same U-Net evaluations (two per step here: guidance runs the conditional and the
# unconditional prompt in one batch). DDPM adds fresh noise at every step; DDIM and Euler follow the
# deterministic probability-flow ODE; DPM-Solver++(2M) is a second-order ODE solver. Same prompts,
# same seeds; prompt adherence reads colour, shape and background back from the pixels.

# %%
prompts = ["a red circle on a white background", "a green square on a black background",
           "a blue triangle on a gray background", "a yellow circle on a black background",
           "a magenta square on a gray background", "a cyan triangle on a white background"] * 3
seeds = list(range(len(prompts)))
rows = {}
for sampler in ("ddpm", "ddim", "euler", "dpmpp_2m"):
    images = pipe(prompts, 32, 32, num_inference_steps=num_inference_steps, guidance_scale=2.0, sampler=sampler,
                  seed=seeds)
    rows[sampler] = images
    rates = adherence_rates(images, prompts)
    print(f"{sampler:9s} {num_inference_steps} steps: colour {rates['colour']:.0%}, shape {rates['shape']:.0%}, "
          f"background {rates['background']:.0%}, all three {rates['all']:.0%} of {len(prompts)} images")
tiles = [image for sampler in rows for image in to_pil_images(rows[sampler][:6])]
display(captioned_grid(tiles, [f"{s}: {p}" for s in rows for p in prompts[:6]], columns=6, tile_size=80))

# %% [markdown]
# At this budget the deterministic samplers agree closely with one another (they solve the same ODE
# from the same noise); DDPM's injected noise gives different images from the same seeds.
#
# ## The guidance scale
#
# Classifier-free guidance extrapolates from the unconditional prediction towards the conditional
# one: uncond + w (cond - uncond). w = 1 is the plain conditional model; larger w follows the prompt
# more literally, at the cost of variety and, pushed far, of image quality.

# %%
scales = (1.0, 2.0, 4.0, 8.0)
tiles, captions = [], []
for scale in scales:
    images = pipe(prompts, 32, 32, num_inference_steps=num_inference_steps, guidance_scale=scale,
                  sampler="dpmpp_2m", seed=seeds)
    rates = adherence_rates(images, prompts)
    print(f"guidance {scale:3.1f}: colour {rates['colour']:.0%}, shape {rates['shape']:.0%}, all three {rates['all']:.0%}")
    tiles += to_pil_images(images[:6])
    captions += [f"w={scale}: {p}" for p in prompts[:6]]
display(captioned_grid(tiles, captions, columns=6, tile_size=80))

# %% [markdown]
# ## What you should now know
#
# - Sampling is a loop over timesteps around one denoiser call; the model's x0 estimate shows what it
#   "sees" at each step, long before the noise is gone.
# - Samplers differ only in how they step from one noise level to the next: stochastic (DDPM) or
#   along an ODE (DDIM, Euler, DPM-Solver++); ldm's all take `denoise(x, t)` and cost one call per step.
# - Guidance is a wrapper of that call (`classifier_free_guidance`), not part of any sampler; its
#   scale trades diversity for prompt adherence.
