# %% [markdown]
# # 5. Inside the U-Net: the timestep, the text, and where each word looks
#
# The U-Net takes three inputs: the noisy latent x_t, the timestep t and the caption's token states.
# This notebook opens the demo U-Net (`ldm.models.unet.UNetModel`, trained briefly by `tiny_model.py`)
# and shows:
#
# 1. how the timestep enters every ResBlock: added to the features, or as a scale and shift;
# 2. where the text enters: the cross-attention layers, their resolutions and shapes;
# 3. the cross-attention maps of a prompt's words over the image, and a measurement over many images of
#    how much of the colour word's attention falls on the shape, against the shape's share of the image.

# %% tags=["parameters"]
cache_dir = "../models/notebooks"
num_measured = 216  # validation images in the attention measurement

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from ldm.data.shards import image_text_dataset
from ldm.data.synthetic import ensure_synthetic_dataset, shape_coverage
from ldm.diffusion.objectives import q_sample
from ldm.models.unet import ResBlock, timestep_embedding
from tiny_model import tiny_model

plt.rcParams.update({"figure.dpi": 72, "font.size": 9})
module = tiny_model(cache_dir)
unet = module.ema_network.module  # the weights that generate
print(f"U-Net: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters")

# %% [markdown]
# ## The timestep
#
# t becomes a sinusoidal vector (`timestep_embedding`, as in the Transformer's positions), then an MLP
# (`unet.time_embed`) makes it the embedding `emb` that every ResBlock receives. Each ResBlock projects
# `emb` to one number per channel and **adds** it to its features (SD 1.x/2.x), or, with
# `use_scale_shift_norm=True` (ADM, Dhariwal & Nichol 2021), to a **scale and a shift** applied after
# its second normalisation: h = norm(h) (1 + scale) + shift.

# %%
t = torch.arange(0, 1000, 10)
with torch.no_grad():
    emb = unet.time_embed(timestep_embedding(t, unet.model_channels))
    first = unet.input_blocks[1][0]  # the first ResBlock
    added = first.emb_layers(emb)  # (100, channels): what this block adds to its features at each t
figure, (left, right) = plt.subplots(1, 2, figsize=(9, 2.8))
left.imshow(timestep_embedding(t, unet.model_channels).T, aspect="auto", cmap="RdBu", extent=(0, 1000, unet.model_channels, 0))
left.set(xlabel="t", ylabel="dimension", title="sinusoidal timestep embedding")
right.plot(t, added[:, :8])
right.set(xlabel="t", title="first ResBlock: the per-channel shift added at each t (8 channels)")
plt.tight_layout()
plt.show()

scale_shift = ResBlock(32, emb.shape[1], 32, use_scale_shift_norm=True, norm_num_groups=8)
print(f"added: emb_layers {first.emb_layers[1]} -> one value per channel")
print(f"scale-shift: emb_layers {scale_shift.emb_layers[1]} -> a scale and a shift per channel")

# %% [markdown]
# The trained block has learnt a smooth function of t: the network knows how noisy its input is and
# changes what it does accordingly. Scale-shift lets t also multiply the features (switch channels on
# and off per noise level), which ADM found to help; the demo, like Stable Diffusion, adds.
#
# ## Where the text enters
#
# Text reaches the U-Net only through cross-attention: in each `SpatialTransformer`, `attn2` lets every
# latent pixel (a query) attend to the caption's token states (keys and values). The demo has one at
# every level of the U-Net:

# %%
layers = {name: layer for name, layer in unet.named_modules() if name.endswith("attn2")}
for name, layer in layers.items():
    print(f"{name:48s} heads {layer.heads}, queries {layer.to_q.in_features}-dim, "
          f"tokens {layer.to_k.in_features}-dim")
tokens = module.text_encoder.tokenize(["a red circle on a white background"])[0]
print("token ids:", tokens.tolist(), "(start, 7 words, end, padding)")

# %% [markdown]
# ## Recording the attention maps
#
# ldm's attention runs through `scaled_dot_product_attention`, which never forms the attention matrix;
# `CrossAttention.attention_probs` recomputes it from a layer's inputs. A forward hook on every `attn2`
# records, per layer and head, the probability that each pixel gives each token.

# %%
def record_cross_attention(model, x_t, t, context):
    """{layer name: (B, heads, side, side, tokens)} cross-attention probabilities of one U-Net call."""
    maps = {}

    def hook(name):
        def save(layer, args, output):
            probs = layer.attention_probs(*args)  # (B, heads, pixels, tokens)
            side = int(probs.shape[2] ** 0.5)
            maps[name] = probs.unflatten(2, (side, side))
        return save

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            model(x_t, t, context)
    finally:
        for handle in handles:
            handle.remove()
    return maps

# %% [markdown]
# ## The data to look at
#
# Validation images of the built-in set, encoded, noised to t = 300 and passed through the U-Net with their
# captions, with each shape's exact coverage map rebuilt from the image's metadata.

# %%
_, val_shards = ensure_synthetic_dataset(f"{cache_dir}/data")
dataset = image_text_dataset(val_shards, resolution=32, train=False, rank=0, world_size=1)
dataset.keep_metadata = True
images, captions, coverages = [], [], []
for sample in dataset:
    facts = sample["json"]
    images.append(sample["image"]), captions.append(sample["caption"])
    coverages.append(torch.from_numpy(shape_coverage(facts["shape"], facts["size"], tuple(facts["centre"]), 32)))
    if len(images) == num_measured:
        break
images, coverages = torch.stack(images), torch.stack(coverages)  # (N, 3, 32, 32) in [-1, 1]; (N, 32, 32)

with torch.no_grad():
    latents = module.encode_images(images)
    context = module.conditioning(captions).tokens
t = torch.full((len(latents),), 300)
noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
maps = record_cross_attention(unet, q_sample(latents, t, noise, module.alphas_cumprod), t, context)


# %% [markdown]
# ## Measured, not only shown
#
# For each image: the share of the colour word's attention (summed over a map's pixels) that falls on
# the shape, with the shape's exact coverage from the data set's metadata pooled to the map's grid. A
# word that every pixel read alike would score the shape's share of the image. First per layer,
# averaged over heads:

# %%
def share_on_shape(attention, coverage):
    """(N,) share of a token's attention (N, side, side) inside the shape; coverage (N, 32, 32) pooled to side."""
    pooled = F.adaptive_avg_pool2d(coverage[:, None], attention.shape[-1])[:, 0]
    return (attention * pooled).sum((1, 2)) / attention.sum((1, 2))


area = coverages.mean()
print(f"shape's share of the image: {area:.3f}\n{'layer':48s} side  colour  shape  background colour")
for name, layer_map in maps.items():
    shares = [share_on_shape(layer_map.mean(1)[..., p], coverages).mean() for p in (2, 3, 6)]
    print(f"{name:48s} {layer_map.shape[2]:4d}  " + "  ".join(f"{s:6.3f}" for s in shares))

# %% [markdown]
# Averaged over heads, most layers read the words almost uniformly: a briefly trained model mostly
# broadcasts the caption to every pixel. But heads specialise. Choosing the best of dozens of heads on
# the same images would flatter any of them, so choose on one half of the images (the head whose
# colour-word attention falls most on the shapes there) and measure on the other half, where a head
# that read the word alike everywhere would score the shape's area share, up to sampling noise:

# %%
def colour_share(name, head, images_slice):
    """(n,) the colour word's attention share on the shape for one head, over a slice of the images."""
    return share_on_shape(maps[name][images_slice, head, ..., 2], coverages[images_slice])


chosen_on, measured_on = slice(0, len(images) // 2), slice(len(images) // 2, len(images))
heads = [(name, head) for name, m in maps.items() for head in range(m.shape[1])]
chosen = max(heads, key=lambda key: colour_share(*key, chosen_on).mean())
share = colour_share(*chosen, measured_on)
area_each = coverages[measured_on].mean((1, 2))
excess = share - area_each  # per image: attention on the shape beyond its area
standard_errors = excess.mean() / (excess.std() / len(excess) ** 0.5)
print(f"chosen on images 1-{len(images) // 2}: {chosen[0]} head {chosen[1]}")
print(f"measured on the other {len(share)} images at t=300: colour-word attention on the shape: "
      f"{share.mean():.3f}; shape's area share: {area_each.mean():.3f} ({share.mean() / area_each.mean():.2f}x, "
      f"{standard_errors:.1f} standard errors above)")

# %% [markdown]
# ## The words over the image
#
# The maps of that head for three of the measured images, per word, upsampled to the image: bright
# where pixels attend to the word.

# %%
words = {2: "colour", 3: "shape", 6: "background colour", 8: "end"}
level = maps[chosen[0]][:, chosen[1]]  # the chosen head
figure, axes = plt.subplots(3, 1 + len(words), figsize=(8, 5.4))
for row, index in enumerate(range(len(images) // 2, len(images) // 2 + 3)):
    axes[row, 0].imshow((images[index].permute(1, 2, 0) + 1) / 2)
    axes[row, 0].set_ylabel(captions[index].replace(" on a ", "\non a "), fontsize=8)
    caption_words = ["<start>"] + captions[index].split() + ["<end>"]
    for column, (position, label) in enumerate(words.items(), start=1):
        upsampled = F.interpolate(level[index, None, None, :, :, position], size=32, mode="bilinear")[0, 0]
        axes[row, column].imshow(upsampled, cmap="magma")
        axes[row, column].set_title(f'"{caption_words[position]}"', fontsize=8)
for axis in axes.flat:
    axis.set_xticks([]), axis.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What you should now know
#
# - The timestep enters every ResBlock through the embedding `emb`, as an added per-channel shift
#   (SD) or as a scale and a shift (ADM's `use_scale_shift_norm`).
# - The text enters only through cross-attention (`attn2` in every transformer block): pixels are
#   queries, caption tokens are keys and values.
# - The attention maps are measurable: `CrossAttention.attention_probs` and a forward hook give, for
#   each pixel, how much it reads each word. In this briefly trained model most heads still read the
#   caption uniformly, but a head chosen on some images puts the colour word's attention on the shape
#   of other images, above the shape's share of the image by many standard errors: where a word acts is
#   learnt, head by head. Choose on one set and measure on another, or the best of many looks better
#   than it is.
