"""Training objectives side by side: the demo recipe with epsilon (today's), flow matching (logit-normal
times) and EDM, at the demo's budget (its step count and time cap), two seeds each, alternating.

Each run is ``python train.py experiment=demo`` with the objective's overrides (``model/objective=flow|edm``
replaces the demo's discrete objective with its min-SNR weighting whole). Each
model is then scored with the evaluation job's code path (``generate_and_score``) on the built-in
validation captions: prompt adherence (all three facts right) and FID/KID on the offline scene-classifier
features. Samplers get about the same number of model calls: DDIM 50 steps, flow Euler 50 steps, EDM
Heun 25 steps (49 calls).

    python benchmarks/objectives.py                 # full size: 6 demo runs (~11 min each on 2 cores)
    python benchmarks/objectives.py --tiny          # about a minute: a few steps in a temporary root

Needs the stage-1 VAE (models/demo/vae.safetensors, from ``python train.py experiment=demo_vae``) in
--root; --tiny builds a tiny one in its temporary root. Prints a table; writes
benchmarks/results/objectives.json (--tiny: objectives_tiny.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DEMO_GUIDANCE_SCALE, machine_info  # noqa: E402
from ldm.data.synthetic import ensure_synthetic_dataset  # noqa: E402
from ldm.evaluation.evaluate import SamplingSettings, generate_and_score  # noqa: E402
from ldm.evaluation.metrics import distribution_metrics  # noqa: E402
from ldm.evaluation.reference import reference_features  # noqa: E402
from ldm.evaluation.scene_classifier import builtin_scene_classifier  # noqa: E402
from ldm.pipeline import TextToImagePipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = {
    "epsilon": {"overrides": [], "steps": 50},
    "flow (logit-normal)": {"overrides": ["model/objective=flow", "callbacks.sample_grid.sampler=null"], "steps": 50},
    "edm": {"overrides": ["model/objective=edm", "callbacks.sample_grid.sampler=null"], "steps": 25},
}
FULL_SYNTHETIC = dict(num_train=4096, num_val=256, samples_per_shard=256, resolution=32, seed=0)
TINY_SYNTHETIC = dict(num_train=256, num_val=64, samples_per_shard=64, resolution=32, seed=0)
TINY_DATA = ["data.synthetic.num_train=256", "data.synthetic.num_val=64", "data.synthetic.samples_per_shard=64",
             "data.batch_size=16", "data.val_batch_size=16", "data.num_workers=0", "trainer.limit_val_batches=1"]
TINY_TRAINING = ["trainer.max_steps=4", "trainer.val_check_interval=4", "model.lr_schedule.warmup_steps=1",
                 "callbacks.sample_grid.num_inference_steps=2"]


def train(root: Path, run_name: str, overrides: list[str]) -> Path:
    """One ``train.py`` run in ``root`` (LDM_ROOT); returns its last checkpoint."""
    run_dir = root / "runs" / run_name
    command = [sys.executable, str(ROOT / "train.py"), "logger=csv", f"hydra.run.dir={run_dir}", *overrides]
    environment = {**os.environ, "LDM_ROOT": str(root), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, cwd=ROOT, env=environment, check=True)
    return run_dir / "checkpoints" / "last.ckpt"


def summary(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{mean:8.3f} ± {spread:.3f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a few steps on a small data set in a temporary root")
    parser.add_argument("--root", default=None, help="LDM_ROOT with data/ and models/demo/vae.safetensors "
                                                     "(default: the repository; --tiny: a temporary folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num-samples", type=int, default=None, help="images scored per model (default 256; tiny 16)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    temporary = tempfile.TemporaryDirectory() if args.tiny and args.root is None else None
    root = Path(temporary.name if temporary else (args.root or ROOT))
    synthetic = {"data_dir": str(root / "data"), **(TINY_SYNTHETIC if args.tiny else FULL_SYNTHETIC)}
    extra = TINY_DATA + TINY_TRAINING if args.tiny else []
    num_samples = args.num_samples or (16 if args.tiny else 256)
    output = Path(args.output or ROOT / "benchmarks" / "results" / ("objectives_tiny.json" if args.tiny else "objectives.json"))

    if not (root / "models" / "demo" / "vae.safetensors").is_file():
        if not args.tiny:
            raise SystemExit(f"{root}/models/demo/vae.safetensors is missing: run python train.py experiment=demo_vae")
        train(root, "vae", ["experiment=demo_vae", "trainer.max_steps=4", "trainer.val_check_interval=4", *TINY_DATA])

    runs = []
    for seed in args.seeds:  # alternate the objectives within each seed, so machine drift hits all alike
        for name, spec in OBJECTIVES.items():
            started = time.perf_counter()
            ckpt = train(root, f"{name.split()[0]}_seed{seed}", ["experiment=demo", f"seed={seed}",
                                                                 *spec["overrides"], *extra])
            runs.append({"objective": name, "seed": seed, "checkpoint": str(ckpt),
                         "train_seconds": round(time.perf_counter() - started, 1)})

    extractor = builtin_scene_classifier(synthetic, cache_dir=root / "models" / "eval",
                                         **({"steps": 20, "min_accuracy": 0.0} if args.tiny else {}))
    _, val_shards = ensure_synthetic_dataset(**synthetic)
    real, captions, _ = reference_features(val_shards, 32, extractor, extractor.name, root / "models" / "eval" / "ref")
    captions = [captions[i % len(captions)] for i in range(num_samples)]
    for run in runs:
        pipeline = TextToImagePipeline.from_pretrained(run["checkpoint"])  # the EMA U-Net
        spec = OBJECTIVES[run["objective"]]
        settings = SamplingSettings(sampler=None, num_inference_steps=spec["steps"], seed=1_000_000, height=32,
                                    width=32, batch_size=64)
        scored = generate_and_score(pipeline, captions, DEMO_GUIDANCE_SCALE, settings, extractor)
        metrics = distribution_metrics(real, scored["features"], kid_subset_size=min(100, num_samples), kid_subsets=50)
        all_three = scored["adherence"]["all"]
        run.update(prediction_type=pipeline.prediction_type, adherence_all=sum(all_three) / len(all_three), fid=metrics["fid"], kid_mean=metrics["kid_mean"],
                   sample_seconds=round(scored["seconds"], 1), sampler_steps=spec["steps"])

    print(f"\nObjectives on the demo recipe, {len(args.seeds)} seeds each ({'tiny' if args.tiny else 'full'}); "
          f"mean ± half-range over seeds\n")
    print(f"{'objective':<22}{'adherence (all 3)':>20}{'FID':>20}{'train s':>12}")
    table = {}
    for name in OBJECTIVES:
        rows = [run for run in runs if run["objective"] == name]
        table[name] = {key: statistics.fmean(run[key] for run in rows)
                       for key in ("adherence_all", "fid", "kid_mean", "train_seconds")}
        print(f"{name:<22}{summary([r['adherence_all'] for r in rows]):>20}{summary([r['fid'] for r in rows]):>20}"
              f"{table[name]['train_seconds']:>12.0f}")
    baseline = table["epsilon"]
    for name in list(OBJECTIVES)[1:]:
        table[name]["fid_ratio_to_epsilon"] = table[name]["fid"] / baseline["fid"] if baseline["fid"] else None
        table[name]["adherence_minus_epsilon"] = table[name]["adherence_all"] - baseline["adherence_all"]

    result = {
        "settings": {"tiny": args.tiny, "seeds": args.seeds, "num_samples": num_samples,
                     "guidance_scale": DEMO_GUIDANCE_SCALE, "extra_overrides": extra,
                     "objectives": OBJECTIVES, "feature_extractor": extractor.name},
        "runs": runs, "table": table, "machine": machine_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    if temporary:
        temporary.cleanup()
    return result


if __name__ == "__main__":
    main()
