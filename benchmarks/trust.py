"""Numbers researchers can trust, measured on the demo: interval widths against sample count, paired comparisons,
precision/recall/density/coverage orderings, the memorization share, and (with --posthoc-run) the post-hoc EMA.

Everything goes through the evaluation job's own functions (``generate_and_score``, ``MetricSet``,
``bootstrap_intervals``, ``paired_comparison``, ``precision_recall_density_coverage``, ``memorization_check``)
with the offline scene-classifier features on the built-in validation set.

    python benchmarks/trust.py --model outputs/train/demo/<time>/model [--num-samples 256] [--steps 50]
    python benchmarks/trust.py --model ... --posthoc-run outputs/train/<run>   # + FID against sigma_rel

Writes benchmarks/results/trust.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info  # noqa: E402
from benchmarks.fid_checkpoints import untrained_like  # noqa: E402
from ldm.data.synthetic import ensure_synthetic_dataset  # noqa: E402
from ldm.evaluation.analysis import sample_scores  # noqa: E402
from ldm.evaluation.evaluate import SamplingSettings, generate_and_score  # noqa: E402
from ldm.evaluation.manifold import precision_recall_density_coverage  # noqa: E402
from ldm.evaluation.memorization import memorization_check  # noqa: E402
from ldm.evaluation.metrics import PooledPixelFeatures  # noqa: E402
from ldm.evaluation.reference import extract_features, read_image_caption_set  # noqa: E402
from ldm.evaluation.scene_classifier import builtin_scene_classifier  # noqa: E402
from ldm.evaluation.uncertainty import MetricSet, SampleScores, bootstrap_intervals, paired_comparison  # noqa: E402
from ldm.pipeline import TextToImagePipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the trained demo model (folder or checkpoint)")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1_000_000)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--posthoc-run", default=None, help="a run trained with callbacks=diffusion_posthoc_ema")
    parser.add_argument("--sigma-rels", type=float, nargs="+", default=[0.02, 0.04, 0.06, 0.08, 0.12, 0.18, 0.25])
    parser.add_argument("--posthoc-samples", type=int, default=128)
    parser.add_argument("--posthoc-steps", type=int, default=25)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "trust.json"))
    args = parser.parse_args()

    synthetic = dict(data_dir=str(ROOT / "data"), num_train=4096, num_val=256, samples_per_shard=256, resolution=32, seed=0)
    train_shards, val_shards = ensure_synthetic_dataset(**synthetic)
    extractor = builtin_scene_classifier(synthetic, cache_dir=ROOT / "models" / "eval")
    val_images, val_captions = read_image_caption_set(val_shards, 32)
    train_images, _ = read_image_caption_set(train_shards, 32)
    real = extract_features(extractor, val_images)
    train_features = extract_features(extractor, train_images)
    pixels = PooledPixelFeatures(8)
    captions = [val_captions[i % len(val_captions)] for i in range(args.num_samples)]
    settings = SamplingSettings(num_inference_steps=args.steps, seed=args.seed, height=32, width=32, batch_size=128)
    metrics = MetricSet(real, kid_subset_size=100, kid_subsets=10)
    result: dict = {"feature_extractor": {"name": extractor.name, "val_accuracy": extractor.val_accuracy},
                    "model": args.model, "num_samples": args.num_samples, "sampler": "ddim", "steps": args.steps,
                    "guidance_scale": args.guidance_scale, "seed": args.seed, "resamples": args.resamples}

    trained = TextToImagePipeline.from_pretrained(args.model)
    started = time.perf_counter()
    scored = {"trained": generate_and_score(trained, captions, args.guidance_scale, settings, extractor, pixel_size=8)}
    print(f"generated {args.num_samples} trained samples in {time.perf_counter() - started:.0f} s", flush=True)
    scored["trained, other seeds"] = generate_and_score(trained, captions, args.guidance_scale,
                                                        SamplingSettings(**{**settings.__dict__, "seed": args.seed + 10**7}),
                                                        extractor, pixel_size=8)
    scored["untrained"] = generate_and_score(untrained_like(trained), captions, args.guidance_scale, settings, extractor,
                                             pixel_size=8)
    noise = torch.rand(args.num_samples, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = {name: sample_scores(value) for name, value in scored.items()}
    scores["uniform noise"] = SampleScores(extract_features(extractor, noise))

    # 1. Interval width against n: the first n samples, percentile bootstrap over them.
    widths = []
    print(f"\n{'n':>5} {'FID':>9} {'low':>9} {'high':>9} {'width':>8} {'width*sqrt(n)':>14}")
    for n in (64, 128, 256):
        if n > args.num_samples:
            continue
        subset = scores["trained"].take(torch.arange(n))
        point = metrics(subset, torch.Generator().manual_seed(0))
        interval = bootstrap_intervals(metrics, subset, args.resamples, 0.95, seed=0)
        width = interval["fid"]["high"] - interval["fid"]["low"]
        widths.append({"n": n, "fid": point["fid"], "interval": interval, "fid_width": width,
                       "fid_width_times_sqrt_n": width * math.sqrt(n)})
        print(f"{n:>5} {point['fid']:>9.3f} {interval['fid']['low']:>9.3f} {interval['fid']['high']:>9.3f} "
              f"{width:>8.3f} {width * math.sqrt(n):>14.2f}", flush=True)
    result["interval_widths"] = widths

    # 2. Paired comparisons on the same captions and seeds.
    result["comparisons"] = {}
    for first, second in [("trained", "trained"), ("trained", "untrained"), ("trained", "trained, other seeds")]:
        comparison = paired_comparison(metrics, scores[first], scores[second], args.resamples, 0.95, seed=0)
        result["comparisons"][f"{first} vs {second}"] = comparison
        print(f"{first + ' vs ' + second:<36} FID difference {comparison['fid']['difference']:8.3f} "
              f"[{comparison['fid']['low']:.3f}, {comparison['fid']['high']:.3f}] p={comparison['fid']['p_value']:.4f}",
              flush=True)

    # 3. Precision/recall/density/coverage: real vs real (training images vs the validation set) and the models.
    manifold = {"real (train) vs real (val)": precision_recall_density_coverage(real, train_features[: len(real)])}
    for name in ("uniform noise", "untrained", "trained"):
        manifold[name] = precision_recall_density_coverage(real, scores[name].features)
    for name, values in manifold.items():
        print(f"{name:<28} " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()), flush=True)
    result["precision_recall_density_coverage"] = {"k": 5, **manifold}

    # 4. Memorization: each trained sample's nearest training image, thresholds from the validation images.
    check = memorization_check(scores["trained"].features, scored["trained"]["pixels"], train_features,
                               extract_features(pixels, train_images), real, extract_features(pixels, val_images))
    result["memorization"] = {"num_train": len(train_images), "pixel_size": 8, **check.summary()}
    print("memorization:", result["memorization"], flush=True)

    if args.posthoc_run:
        result["posthoc_ema"] = posthoc_curve(Path(args.posthoc_run), args, extractor, real, val_captions)
    result.update(machine=machine_info(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


def posthoc_curve(run: Path, args: argparse.Namespace, extractor, real: torch.Tensor, val_captions: list[str]) -> dict:
    """FID of each sigma_rel's post-hoc EMA of a run against its fixed-decay EMA, and the reconstruction of the
    profile the run tracked directly (``direct_*.pt``)."""
    from ldm.interchange.posthoc_ema import apply_posthoc_ema, synthesize_state

    snapshots = run / "posthoc_ema"
    model = run / "model"
    captions = [val_captions[i % len(val_captions)] for i in range(args.posthoc_samples)]
    settings = SamplingSettings(num_inference_steps=args.posthoc_steps, seed=args.seed, height=32, width=32,
                                batch_size=128)
    metrics = MetricSet(real, kid_subset_size=100, kid_subsets=10)
    out: dict = {"run": str(run), "num_samples": args.posthoc_samples, "steps": args.posthoc_steps,
                 "snapshot_settings": json.loads((snapshots / "posthoc_ema.json").read_text())}
    for direct_file in sorted(snapshots.glob("direct_*.pt")):
        sigma_rel = float(direct_file.stem.split("_", 1)[1])
        direct = torch.load(direct_file, weights_only=True)
        synthesized = synthesize_state(snapshots, sigma_rel, step=direct["step"])
        tracked = {k.removeprefix("ema_model."): v for k, v in direct["state_dict"].items()}
        raw = TextToImagePipeline.from_pretrained(run / "checkpoints" / "last.ckpt", use_ema=False).network.state_dict()
        num = sum(float((synthesized[k] - tracked[k]).pow(2).sum()) for k in synthesized)
        den = sum(float(tracked[k].pow(2).sum()) for k in synthesized)
        raw_gap = sum(float((raw[k] - tracked[k]).pow(2).sum()) for k in synthesized)
        out["direct_check"] = {"sigma_rel": sigma_rel, "step": direct["step"],
                               "relative_error": math.sqrt(num / den), "raw_vs_ema_relative": math.sqrt(raw_gap / den)}
        print("post-hoc EMA reconstruction vs directly tracked:", out["direct_check"], flush=True)
    pipeline = TextToImagePipeline.from_pretrained(model)
    fixed = generate_and_score(pipeline, captions, args.guidance_scale, settings, extractor)
    out["fixed_ema"] = {"fid": metrics(sample_scores(fixed), torch.Generator().manual_seed(0))["fid"]}
    print(f"fixed-decay EMA: FID {out['fixed_ema']['fid']:.3f}", flush=True)
    rows = []
    for sigma_rel in args.sigma_rels:
        apply_posthoc_ema(pipeline, snapshots, sigma_rel)
        scored = generate_and_score(pipeline, captions, args.guidance_scale, settings, extractor)
        values = metrics(sample_scores(scored), torch.Generator().manual_seed(0))
        rows.append({"sigma_rel": sigma_rel, "fid": values["fid"], "adherence_all": values.get("adherence_all")})
        print(f"sigma_rel {sigma_rel:.3f}: FID {values['fid']:.3f}", flush=True)
    out["rows"] = rows
    out["best"] = min(rows, key=lambda row: row["fid"])
    return out


if __name__ == "__main__":
    main()
