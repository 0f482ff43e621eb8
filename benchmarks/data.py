"""The data pipeline's speed: decoding, and training from precomputed latents.

1. Images per second per worker (one process, one thread, as a dataloader worker runs) for
   decode + metadata filters + resize + random crop to 256 px, from realistic 512-1024 px JPEGs
   that the benchmark makes (photo-like content, quality 90, shards written by ldm.tools.make_shards),
   against a plain loop over the same files: PIL open, convert to RGB, resize the short side to 256
   (bicubic), centre crop, to an array; and the same pipeline with aspect-ratio buckets (the
   bucket_grid of 256^2 pixels, side step 64, aspect ratios up to 2: each image to its nearest
   bucket). Passes alternate; medians.
2. Time from resume to the first batch, at 10% and at 90% of an epoch of 20,000 samples per rank
   of the built-in 32 px set (its data=synthetic settings: batch 64, 2 workers, shuffle buffer 1000),
   square and bucketed: a new datamodule loads the saved state, builds its loader and takes one
   batch. The consumed samples are walked over by their tar headers, not decoded. Alternating; medians.
3. Training steps per second of the same LatentDiffusion (the SD VAE preset, 84M parameters, random
   weights; the tiny U-Net on 32x32x4 latents; batch 2 of 256 px) from pixel shards (VAE encode every
   step) and from latent shards written by ldm.tools.precompute_latents (no encode). Batches are read
   before the clock starts, so only the step is timed; steps alternate; medians.

    python benchmarks/data.py [--images 64] [--passes 5] [--steps 3] [--batch-size 2] [--device cpu|cuda]

Writes benchmarks/results/data.json. Targets: the pipeline >= 2x the plain loop; bucketed decoding within
10% of square; resume at 90% within 2x of resume at 10%; latents >= 3x per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, machine_info  # noqa: E402
from ldm.checkpoints import save_weights  # noqa: E402
from ldm.data.buckets import bucket_grid  # noqa: E402
from ldm.data.datamodule import LatentShardDataModule, ShardDataModule  # noqa: E402
from ldm.data.filters import MetadataFilters  # noqa: E402
from ldm.data.image_shards import folder_records, write_shards  # noqa: E402
from ldm.data.precompute import precompute_latents  # noqa: E402
from ldm.data.shards import ImageTextDataset  # noqa: E402
from ldm.data.synthetic import ensure_synthetic_dataset  # noqa: E402

RESOLUTION = 256
# Pixel noise of the made photos (0-255 levels): 3 gives ~1.9 bits per pixel at quality 90, as web
# photos have (1: ~1.6, 6: ~2.7; the pipeline/plain ratio measured about the same at all three).
NOISE_STD = 3.0
FILTERS = MetadataFilters(min_width=256, min_height=256, max_punsafe=0.5, max_pwatermark=0.8,
                          min_caption_length=3, max_caption_length=300)


def photo_like(rng: np.random.Generator, width: int, height: int, noise_std: float) -> Image.Image:
    """A smooth random field with detail and noise: compresses like a photograph, not like a flat colour."""
    coarse = rng.uniform(0, 255, size=(height // 64 + 2, width // 64 + 2, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    fine = rng.normal(0, 1, size=(height // 4, width // 4, 1)).astype(np.float32)
    detail = np.asarray(Image.fromarray(((fine[..., 0] + 3) * 40).clip(0, 255).astype(np.uint8))
                        .resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    noise = rng.normal(0, noise_std, size=(height, width, 1))
    return Image.fromarray((image * 0.8 + detail[..., None] * 0.3 + noise - 20).clip(0, 255).astype(np.uint8))


def make_images(directory: Path, count: int, noise_std: float = NOISE_STD, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of 512-1024 px per side (quality 90) with captions and LAION-style JSON beside them."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        width, height = (int(v) for v in rng.integers(512, 1025, size=2))
        path = directory / f"{index:05d}.jpg"
        photo_like(rng, width, height, noise_std).save(path, quality=90)
        path.with_suffix(".txt").write_text(f"a photograph number {index} of a landscape with hills")
        path.with_suffix(".json").write_text(json.dumps({"punsafe": float(rng.uniform(0, 0.2)),
                                                         "pwatermark": float(rng.uniform(0, 0.5))}))
        paths.append(path)
    return paths


def plain_loop(paths: list[Path]) -> int:
    """The baseline: PIL open, RGB, bicubic resize of the short side to 256, centre crop, array."""
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = RESOLUTION / min(image.size)
            size = (max(RESOLUTION, round(image.width * scale)), max(RESOLUTION, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            left, top = (size[0] - RESOLUTION) // 2, (size[1] - RESOLUTION) // 2
            np.asarray(image.crop((left, top, left + RESOLUTION, top + RESOLUTION)))
    return len(paths)


BUCKETS = bucket_grid(RESOLUTION ** 2, 64, 2.0)


def pipeline_pass(shard_spec: str, buckets: list | None = None) -> int:
    """The shard pipeline in one process: tar reading, JSON, filters, draft decode, resize, random crop,
    tensor; with ``buckets``, each image to its nearest bucket and batches of one bucket (of 8)."""
    if buckets is None:
        dataset = ImageTextDataset(shard_spec, RESOLUTION, train=True, mode="exactly_once", filters=FILTERS,
                                   rank=0, world_size=1)
        return sum(1 for sample in dataset if sample["image"].shape[-1] == RESOLUTION)
    dataset = ImageTextDataset(shard_spec, RESOLUTION, train=True, mode="exactly_once", filters=FILTERS,
                               rank=0, world_size=1, buckets=buckets, batch_size=8)
    return sum(len(batch["key"]) for batch in dataset if tuple(batch["image"].shape[-2:]) in buckets)


def timed(function, *args) -> tuple[float, int]:
    started = time.perf_counter()
    count = function(*args)
    return time.perf_counter() - started, count


def decode_benchmark(work: Path, images: int, passes: int, noise_std: float = NOISE_STD) -> dict:
    """Images per second of the pipeline and of the plain loop over the same ``images`` JPEGs."""
    paths = make_images(work / "images", images, noise_std)
    summary = write_shards(folder_records(work / "images"), work / "shards", 16)
    torch.set_num_threads(1)  # one dataloader worker's share
    rates = {"pipeline": [], "bucketed": [], "plain": []}
    pipeline_pass(summary["shard_spec"])  # warm the page cache for all arms
    arms = (("pipeline", lambda: pipeline_pass(summary["shard_spec"])),
            ("bucketed", lambda: pipeline_pass(summary["shard_spec"], BUCKETS)), ("plain", lambda: plain_loop(paths)))
    for _ in range(passes):  # a pass of each, alternating: a pair shares the machine's load at that time
        for name, run in arms:
            seconds, count = timed(run)
            if count != images:
                raise RuntimeError(f"{name} produced {count} of {images} images")
            rates[name].append(count / seconds)
    result = {name: statistics.median(values) for name, values in rates.items()}
    pair_ratios = [pipeline / plain for pipeline, plain in zip(rates["pipeline"], rates["plain"])]
    bucket_ratios = [bucketed / pipeline for bucketed, pipeline in zip(rates["bucketed"], rates["pipeline"])]
    sizes = [Image.open(p).size for p in paths]
    return {
        "images": images, "passes": passes, "mean_jpeg_kib": float(np.mean([p.stat().st_size for p in paths]) / 1024),
        "mean_pixels": float(np.mean([w * h for w, h in sizes])),
        "bits_per_pixel": float(sum(p.stat().st_size for p in paths) * 8 / sum(w * h for w, h in sizes)),
        "noise_std": noise_std, "pipeline_images_per_s": result["pipeline"],
        "plain_images_per_s": result["plain"], "speedup": statistics.median(pair_ratios),
        "bucketed_images_per_s": result["bucketed"], "bucketed_vs_square": statistics.median(bucket_ratios),
        "buckets": [list(bucket) for bucket in BUCKETS],
        "all_passes": rates, "shard_spec": summary["shard_spec"],
    }


RESUME_EPOCH = 20_000
RESUME_BUCKETS = [[32, 32], [32, 48], [48, 32]]


def resume_benchmark(work: Path, repeats: int) -> dict:
    """Seconds from a new datamodule loading a saved state to its first training batch, at 10% and 90% of an
    epoch of the built-in set, square and bucketed (the square set is 1:1, so its images fill the square
    bucket; the bucketed arm still runs the bucket stage, its queues and their resume)."""
    train_spec, _ = ensure_synthetic_dataset(work / "synthetic")
    settings = dict(train_shards=train_spec, resolution=32, batch_size=64, num_workers=2, shuffle_buffer=1000,
                    train_epoch_length=RESUME_EPOCH, caption_dropout_prob=0.1, seed=0)
    arms = {"square": {}, "bucketed": {"buckets": RESUME_BUCKETS, "resolution": 40}}
    states: dict[tuple[str, int], dict] = {}
    for arm, extra in arms.items():
        module = ShardDataModule(**{**settings, **extra})
        module.setup("fit")
        marks = {RESUME_EPOCH // 64 // 10: 10, RESUME_EPOCH * 9 // 64 // 10: 90}
        for batch in module.train_dataloader():
            module.on_before_batch_transfer(batch, 0)
            if module.train_batches_consumed in marks:
                states[(arm, marks[module.train_batches_consumed])] = module.state_dict()
            if len(states) == 2 * (list(arms).index(arm) + 1):
                break
    times: dict[str, list[float]] = {f"{arm}_{percent}": [] for arm in arms for percent in (10, 90)}
    for _ in range(repeats):
        for (arm, percent), state in states.items():
            module = ShardDataModule(**{**settings, **arms[arm]})
            module.setup("fit")
            started = time.perf_counter()
            module.load_state_dict(state)
            loader = module.train_dataloader()
            next(iter(loader))
            times[f"{arm}_{percent}"].append(time.perf_counter() - started)
            del loader
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"epoch_length": RESUME_EPOCH, "batch_size": 64, "num_workers": 2, "shuffle_buffer": 1000,
            "buckets": RESUME_BUCKETS, "repeats": repeats, "seconds": medians, "all_seconds": times,
            "ratio_90_to_10": {arm: medians[f"{arm}_90"] / medians[f"{arm}_10"] for arm in arms}}


def build_module(device: str):
    """LatentDiffusion of the demo with the SD VAE preset (random weights), and its config."""
    from hydra import compose, initialize_config_dir

    from ldm.config import instantiate_module

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "model/vae=sd", "model.latents.vae_weights=null",
                                          "model.latents.scale_factor=0.18215", "model.ema_decay=null"])
    torch.manual_seed(0)
    return instantiate_module(cfg.model).to(device), cfg


def first_batches(datamodule, count: int) -> list[dict]:
    """The first ``count`` training batches of a datamodule."""
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise RuntimeError(f"only {len(batches)} batches")


def training_benchmark(work: Path, image_dir: Path, steps: int, batch_size: int, device: str) -> dict:
    module, cfg = build_module(device)
    vae_weights = save_weights(module.vae, work / "sd-vae.safetensors", {"latent_scale_factor": 0.18215})
    # Pixel batches: one warm-up, then ``steps`` measured; latents are made for the measured images only.
    records = list(folder_records(image_dir))[: (steps + 1) * batch_size]
    pixel_shards = write_shards(records, work / "pixels", len(records))["shard_spec"]
    measured = write_shards(records[batch_size:], work / "measured", len(records))["shard_spec"]
    started = time.perf_counter()
    precompute_latents(
        measured, work / "latents", module.vae, RESOLUTION, {"vae": "sd", "weights": str(vae_weights)},
        batch_size=batch_size, device=device)
    precompute_seconds = time.perf_counter() - started
    common = dict(batch_size=batch_size, num_workers=0, shuffle_buffer=0, caption_dropout_prob=0.1,
                  train_mode="exactly_once")
    pixel_batches = first_batches(ShardDataModule(train_shards=pixel_shards, resolution=RESOLUTION, **common),
                                  steps + 1)
    latent_batches = first_batches(LatentShardDataModule(train_shards=str(work / "latents" / "00000.tar"), **common),
                                   steps)
    optimizer = torch.optim.AdamW(module.network.parameters(), lr=1e-4)

    def step(batch: dict) -> float:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if device == "cuda":
            torch.cuda.synchronize()
        begun = time.perf_counter()
        loss = module.diffusion_loss(module.batch_latents(batch), module.batch_conditioning(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - begun

    times = {"pixels": [], "latents": []}
    step(pixel_batches[0]), step(latent_batches[0])  # warm-up
    for index in range(steps):  # alternating, so the machine's drifts hit both arms alike
        times["pixels"].append(step(pixel_batches[index + 1]))
        times["latents"].append(step(latent_batches[index]))
    pixels, latents = statistics.median(times["pixels"]), statistics.median(times["latents"])
    return {
        "vae": "configs/model/vae/sd.yaml (random weights)",
        "vae_parameters": sum(p.numel() for p in module.vae.parameters()),
        "unet": "configs/model/network/tiny.yaml", "unet_parameters": sum(p.numel() for p in module.network.parameters()),
        "text_encoder": "configs/model/text_encoder/tiny.yaml (run in both arms)",
        "batch_size": batch_size, "steps": steps, "pixel_step_s": pixels, "latent_step_s": latents,
        "speedup": pixels / latents, "precompute_s_per_image": precompute_seconds / (steps * batch_size),
        "all_steps": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resume-repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--noise-std", type=float, default=NOISE_STD, help="pixel noise of the made photos")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/data.json"))
    args = parser.parse_args()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as work:
        decode = decode_benchmark(Path(work), args.images, args.passes, args.noise_std)
        decode.pop("shard_spec")
        torch.set_num_threads(threads)
        resume = resume_benchmark(Path(work), args.resume_repeats)
        training = training_benchmark(Path(work), Path(work) / "images", args.steps, args.batch_size, args.device)
    settings = {**vars(args), "output": str(Path(args.output).resolve().relative_to(ROOT))
                if Path(args.output).resolve().is_relative_to(ROOT) else args.output}
    result = {"machine": machine_info(), "load_average": os.getloadavg(), "settings": settings, "decode": decode,
              "resume": resume, "training": training}
    print(f"\n{'decode + filter + resize + crop to 256 px':<46}{'images/s/worker':>16}")
    print(f"{'  ldm shard pipeline (draft-mode JPEG)':<46}{decode['pipeline_images_per_s']:>16.1f}")
    print(f"{'  plain PIL open + resize + crop loop':<46}{decode['plain_images_per_s']:>16.1f}")
    print(f"{'  ratio, median of paired passes (target >= 2)':<46}{decode['speedup']:>16.2f}")
    print(f"{'  ldm shard pipeline with buckets':<46}{decode['bucketed_images_per_s']:>16.1f}")
    print(f"{'  bucketed / square (target >= 0.9)':<46}{decode['bucketed_vs_square']:>16.2f}")
    print(f"  ({args.images} JPEGs of 512-1024 px, mean {decode['mean_jpeg_kib']:.0f} KiB, "
          f"{decode['bits_per_pixel']:.2f} bits per pixel)")
    print(f"\n{'resume to first batch, epoch of 20,000 samples':<46}{'at 10%':>10}{'at 90%':>10}{'ratio':>8}")
    for arm in ("square", "bucketed"):
        seconds = resume["seconds"]
        print(f"{'  ' + arm + ' (target: ratio <= 2)':<46}{seconds[arm + '_10']:>9.2f}s{seconds[arm + '_90']:>9.2f}s"
              f"{resume['ratio_90_to_10'][arm]:>8.2f}")
    print(f"\n{'training step, SD VAE + tiny U-Net, batch ' + str(args.batch_size):<46}{'s/step':>10}{'steps/s':>10}")
    for name, key in (("  pixel shards (VAE encode each step)", "pixel_step_s"),
                      ("  latent shards (data=latents)", "latent_step_s")):
        print(f"{name:<46}{training[key]:>10.3f}{1 / training[key]:>10.2f}")
    print(f"{'  ratio (target >= 3)':<46}{training['speedup']:>10.2f}")
    print(f"  (device {args.device}; precompute_latents: {training['precompute_s_per_image']:.2f} s per image)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
