"""FID/KID of demo checkpoints along training, against an untrained model, noise, and the real set itself.

Scores each given checkpoint (EMA weights) with the evaluation job's own code path
(``ldm.evaluation.evaluate.generate_and_score``) on the built-in validation set, with the offline
scene-classifier features; adds an untrained model (the same config, fresh seeded weights), uniform
noise images, the real set against itself, and one half of the real set against the other.

    python benchmarks/fid_checkpoints.py --ckpts outputs/train/demo/<time>/checkpoints/step_000800.ckpt ... \
        [--num-samples 256] [--steps 50] [--guidance-scale 2]

Writes benchmarks/results/fid_checkpoints.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info  # noqa: E402
from ldm.data.synthetic import ensure_synthetic_dataset  # noqa: E402
from ldm.evaluation.evaluate import SamplingSettings, generate_and_score  # noqa: E402
from ldm.evaluation.metrics import distribution_metrics  # noqa: E402
from ldm.evaluation.reference import extract_features, read_image_caption_set, reference_features  # noqa: E402
from ldm.evaluation.scene_classifier import builtin_scene_classifier  # noqa: E402
from ldm.interchange.build import build  # noqa: E402
from ldm.pipeline import TextToImagePipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def untrained_like(pipeline: TextToImagePipeline) -> TextToImagePipeline:
    """The same pipeline with a fresh, seeded U-Net (the same frozen VAE and text encoder)."""
    torch.manual_seed(0)
    return TextToImagePipeline(
        network=build(pipeline.model_config["network"]).eval(), vae=pipeline.vae, text_encoder=pipeline.text_encoder,
        alphas_cumprod=pipeline.alphas_cumprod, latent_scale_factor=pipeline.latent_scale_factor,
        prediction_type=pipeline.prediction_type, model_config=pipeline.model_config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpts", nargs="+", required=True, help="training checkpoints, in training order")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1_000_000)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "fid_checkpoints.json"))
    args = parser.parse_args()

    synthetic = dict(data_dir=str(ROOT / "data"), num_train=4096, num_val=256, samples_per_shard=256, resolution=32, seed=0)
    _, val_shards = ensure_synthetic_dataset(**synthetic)
    extractor = builtin_scene_classifier(synthetic, cache_dir=ROOT / "models" / "eval")
    real, captions, _ = reference_features(val_shards, 32, extractor, extractor.name, ROOT / "models" / "eval" / "reference")
    captions = [captions[i % len(captions)] for i in range(args.num_samples)]
    settings = SamplingSettings(num_inference_steps=args.steps, seed=args.seed, height=32, width=32)
    kid = dict(kid_subset_size=100, kid_subsets=100)

    rows = []

    def add(name: str, generated: torch.Tensor, adherence: dict | None = None, seconds: float = 0.0) -> None:
        row = {"model": name, **distribution_metrics(real, generated, **kid)}
        if adherence is not None:
            row["adherence_all"] = sum(adherence["all"]) / len(adherence["all"])
        row["seconds"] = round(seconds, 1)
        rows.append(row)
        print(f"{name:<28} FID {row['fid']:9.3f}   KID {row['kid_mean']:8.4f} ± {row['kid_std']:.4f}"
              + (f"   adherence {row['adherence_all']:.1%}" if "adherence_all" in row else ""), flush=True)

    add("real vs itself", real)
    real_images, _ = read_image_caption_set(val_shards, 32)
    half = len(real_images) // 2
    first_half = extract_features(extractor, real_images[:half])
    rows.append({"model": "real half vs other half",
                 **distribution_metrics(first_half, extract_features(extractor, real_images[half:]), **kid)})
    print(f"{'real half vs other half':<28} FID {rows[-1]['fid']:9.3f}", flush=True)
    noise = torch.rand(args.num_samples, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    add("uniform noise images", extract_features(extractor, noise))

    last = TextToImagePipeline.from_pretrained(args.ckpts[-1])
    for name, pipeline in [("untrained (same config)", untrained_like(last))] + [
            (Path(path).name, TextToImagePipeline.from_pretrained(path)) for path in args.ckpts]:
        scored = generate_and_score(pipeline, captions, args.guidance_scale, settings, extractor)
        add(name, scored["features"], scored["adherence"], scored["seconds"])

    result = {
        "feature_extractor": {"name": extractor.name, "val_accuracy": extractor.val_accuracy},
        "num_real_images": len(real), "num_samples": args.num_samples, "sampler": "ddim", "steps": args.steps,
        "guidance_scale": args.guidance_scale, "seed": args.seed, "checkpoints": args.ckpts, "rows": rows,
        "machine": machine_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
