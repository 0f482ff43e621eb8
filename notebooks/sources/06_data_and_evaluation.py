# %% [markdown]
# # 6. Data and evaluation
#
# Training reads WebDataset shards; evaluation compares generated images with real ones. This notebook
# shows, on the built-in data set and the demo model (trained briefly by `tiny_model.py`):
#
# 1. what a shard holds and how ldm reads it;
# 2. what happens with a dirty shard: skipped samples, counted by reason, never a crash;
# 3. a grid of generated samples with their captions;
# 4. FID and KID of pure noise, of the untrained model and of the trained one against real images.

# %% tags=["parameters"]
cache_dir = "../models/notebooks"
num_generated = 128

# %%
import io
import logging
import tarfile
import tempfile
from pathlib import Path

import torch
from IPython.display import display

from ldm.data.shards import image_text_dataset
from ldm.data.skips import SkipCounter
from ldm.data.synthetic import ensure_synthetic_dataset
from ldm.data.tars import expand_shards
from ldm.evaluation.metrics import PooledPixelFeatures, distribution_metrics
from ldm.evaluation.prompt_adherence import adherence_rates
from ldm.evaluation.reference import extract_features, read_image_caption_set
from ldm.visualization import captioned_grid, to_pil_images
from tiny_model import tiny_model, untrained_model

logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
train_shards, val_shards = ensure_synthetic_dataset(f"{cache_dir}/data")
first_shard = expand_shards(train_shards)[0]
with tarfile.open(first_shard) as tar:
    names = tar.getnames()
    print(f"{Path(first_shard).name}: {len(names)} files, e.g. {names[:3]}")
    print("json:", tar.extractfile(names[2]).read().decode())

# %% [markdown]
# Each sample is three files sharing a key (img2dataset's layout). `image_text_dataset` decodes them
# into a tensor in [-1, 1] and a caption, resized and cropped to the training resolution:

# %%
images, captions = read_image_caption_set(val_shards, resolution=32, limit=256)
print(f"{len(images)} validation images {tuple(images.shape[1:])}, e.g. {captions[0]!r}")
display(captioned_grid(to_pil_images(images[:12]), captions[:12], columns=6, tile_size=80))

# %% [markdown]
# ## A dirty shard
#
# Web-scale data is never clean. Damage a copy of one shard: a corrupt PNG, a missing caption and
# invalid JSON, then cut the tar in the middle. Reading it yields every good sample, warns about the
# first few bad ones, and counts each skip by reason (`SkipCounter`; in training these become
# `data/skipped/<reason>` in the logs, and a skip-rate ceiling stops a run whose data is mostly broken).

# %%
dirty = Path(tempfile.mkdtemp()) / "dirty-000000.tar"
with tarfile.open(first_shard) as source, tarfile.open(dirty, "w") as target:
    for member in source.getmembers()[:90]:  # 30 samples
        data = source.extractfile(member).read()
        if member.name == "000000001.png":
            data = b"\x89PNG\r\n\x1a\n not an image"
        elif member.name == "000000002.txt":
            continue
        elif member.name == "000000003.json":
            data = b'{"caption": "cut'
        member.size = len(data)
        target.addfile(member, io.BytesIO(data))
dirty.write_bytes(dirty.read_bytes()[: dirty.stat().st_size * 2 // 3])  # a truncated download

counter = SkipCounter()
samples = list(image_text_dataset(str(dirty), resolution=32, train=False, skip_counter=counter, rank=0, world_size=1))
print(f"read {len(samples)} good samples; skipped by reason: {counter.as_dict()}")
print("worst shards:", counter.worst_shards())

# %% [markdown]
# ## Generated samples
#
# The trained model's EMA U-Net through the text-to-image pipeline (DPM-Solver++, 20 steps, guidance 2),
# one image per validation caption; prompt adherence reads colour, shape and background back from the pixels.

# %%
model = tiny_model(cache_dir)
prompts = captions[:num_generated]
generated = model.pipeline()(prompts, 32, 32, num_inference_steps=20, guidance_scale=2.0, sampler="dpmpp_2m",
                             seed=list(range(num_generated)))
display(captioned_grid(to_pil_images(generated[:12]), prompts[:12], columns=6, tile_size=80))
print("prompt adherence:", {k: f"{v:.0%}" for k, v in adherence_rates(generated, prompts).items()})

# %% [markdown]
# ## FID and KID
#
# FID fits a Gaussian to features of real and of generated images and measures the distance between
# the two; KID compares them with a polynomial kernel (unbiased, so usable with few images). Both
# depend on the feature extractor. Inception features need downloaded weights, so here the features
# are `PooledPixelFeatures` (images pooled to 4x4x3): enough to tell colour and layout statistics
# apart on this data set, no substitute for Inception on photos. (`eval.py` defaults to a small scene
# classifier trained on the built-in data; see the README.)

# %%
extractor = PooledPixelFeatures(size=4)
real = extract_features(extractor, images)
untrained = untrained_model(cache_dir).pipeline()(prompts, 32, 32, num_inference_steps=20, guidance_scale=2.0,
                                                  sampler="dpmpp_2m", seed=list(range(num_generated)))
candidates = {"uniform noise": torch.rand(num_generated, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
              "untrained model": untrained, "trained model": generated,
              "real (other half)": images[num_generated:2 * num_generated]}
for name, candidate in candidates.items():
    metrics = distribution_metrics(real[:num_generated] if name.startswith("real") else real,
                                   extract_features(extractor, candidate), kid_subset_size=100)
    print(f"{name:18s} FID {metrics['fid']:8.3f}   KID {metrics['kid_mean']:.4f} ± {metrics['kid_std']:.4f}")

# %% [markdown]
# Noise is far from the real images, the untrained model (its output decoded by the trained VAE)
# closer, the trained model closer still, and one half of the real images against the other shows the
# floor these numbers can reach with this many images. FID values are only comparable between runs
# with the same extractor, resolution and number of images.
#
# ## What you should now know
#
# - Shards are tar files of `KEY.png`/`KEY.txt`/`KEY.json`; `image_text_dataset` streams, decodes and
#   crops them, and skips damaged samples and truncated tars, counted by reason, instead of failing.
# - `TextToImagePipeline` makes the sample grids; `adherence_rates` checks prompts on this data set.
# - FID/KID compare feature distributions of real and generated images, and mean nothing without
#   naming the extractor; noise, an untrained and a trained model are the sanity checks of the scale.
