# %% [markdown]
# # 7. Interchange: the notebook's model in diffusers
#
# A model trained with ldm is not locked in. `ldm.interchange.export.export_module` writes it as a diffusers
# folder (U-Net, VAE, CLIP text encoder and tokenizer, a DDIM scheduler with the run's noise schedule)
# that diffusers' own `StableDiffusionPipeline` loads with no ldm code at all. This notebook exports the
# demo model (trained briefly by `tiny_model.py`), generates with both libraries from the same initial
# noise, and compares the images pixel by pixel.

# %% tags=["parameters"]
cache_dir = "../models/notebooks"

# %%
import shutil
import tempfile
from pathlib import Path

import diffusers
import torch
import transformers
from IPython.display import display

from ldm.interchange.export import export_module
from ldm.visualization import captioned_grid, to_pil_images
from tiny_model import tiny_model

diffusers.utils.logging.set_verbosity_error()  # no progress bars or advice in the stored notebook
diffusers.utils.logging.disable_progress_bar()
module = tiny_model(cache_dir)
folder = Path(tempfile.mkdtemp()) / "demo-diffusers"
export_module(module, folder, format="diffusers")  # the EMA U-Net, as ldm generates with
for path in sorted(folder.rglob("*")):
    if path.is_file():
        print(f"{str(path.relative_to(folder)):48s} {path.stat().st_size / 1024:8.1f} KiB")

# %% [markdown]
# Keys are converted in one place (`ldm.checkpoints`: ldm keeps the original Stable Diffusion names,
# diffusers has its own); configs are written by `ldm.interchange.diffusers_configs`; the OpenCLIP text
# tower becomes a transformers `CLIPTextModel`, and its BPE vocabulary a `CLIPTokenizer`.
#
# ## The same image from both libraries
#
# diffusers' pipeline takes the initial latents as an argument, so both start from ldm's per-seed noise.
# Both run DDIM for 20 steps at guidance 2. The exported scheduler counts timesteps as SD 1.x does
# (`steps_offset=1`), so ldm's sampler is told the same.

# %%
transformers.utils.logging.disable_progress_bar()
pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
print(type(pipe).__name__, "with", type(pipe.unet).__name__, type(pipe.text_encoder).__name__,
      type(pipe.scheduler).__name__)

prompts = ["a red circle on a white background", "a blue triangle on a gray background",
           "a yellow square on a black background", "a green circle on a gray background"]
seeds = [0, 1, 2, 3]
ours_pipe = module.pipeline()
ours = ours_pipe(prompts, 32, 32, num_inference_steps=20, guidance_scale=2.0, sampler="ddim", seed=seeds,
                 steps_offset=1)
with torch.no_grad():
    theirs = pipe(prompts, height=32, width=32, num_inference_steps=20, guidance_scale=2.0, output_type="pt",
                  latents=ours_pipe.initial_noise(seeds, 32, 32)).images
difference = (theirs - ours).abs().max()
print(f"largest pixel difference, diffusers vs ldm: {difference:.2e} (pixel range 0..1)")
display(captioned_grid(to_pil_images(torch.cat([ours, theirs])), [f"ldm: {p}" for p in prompts]
                       + [f"diffusers: {p}" for p in prompts], columns=4, tile_size=96))
assert difference < 1e-3, difference
shutil.rmtree(folder.parent)

# %% [markdown]
# The two rows agree to float32 rounding: the same weights, the same schedule and the same sampler
# steps, computed by two independent implementations. (The tests hold this to 1e-4 on every export:
# `tests/interchange/test_diffusers_export.py`.)
#
# ## What you should now know
#
# - `export_module(module, folder, format="diffusers")` (or `python -m ldm.tools.export ... format=diffusers`)
#   turns an ldm model into a folder that `StableDiffusionPipeline.from_pretrained` loads; `format=sd`
#   writes one original-layout `.safetensors` file instead.
# - ldm's U-Net, VAE, schedules and DDIM sampler compute what diffusers' do; the conversion is of key
#   names and configs, not of behaviour.
# - The way back exists too: `model.mode.pretrained.path=<diffusers folder or SD file>` starts an ldm run from
#   released weights.
