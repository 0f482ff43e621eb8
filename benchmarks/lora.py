"""LoRA and DreamBooth on the demo model: does it learn the cross, and does it keep what it knew?

Runs ``experiment=demo_lora`` (the known shapes held by real images), ``experiment=demo_dreambooth`` (held by
the base model's generated images) and demo_lora on the crosses alone (nothing held) from the demo model, each
through train.py (timing each run's wall clock, start-up and export included), then samples the base model and
each fine-tune with the same sampler and seeds (DPM-Solver++(2M), 10 steps, guidance 2 by default):

- the cross: for each of the 18 "a <colour> cross on a <background> background" prompts, how often the
  pixel classifier reads a cross (and all three facts);
- the base prompts (the 54 captions of the demo's set): all-three adherence, against the base model's;
- the LoRA file's size in both layouts, and the trainable fraction of the model's parameters;
- the classifier itself on real rendered crosses (and the other shapes), so the figures can be trusted.

    python benchmarks/lora.py [--model outputs/train/demo/<time>/model] [--images-per-prompt 8] [--runs lora]
    python benchmarks/lora.py --trained lora=outputs/train/demo_lora/<time>   # measure a finished run

Writes benchmarks/results/lora.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import DEMO_GUIDANCE_SCALE, ROOT, machine_info, newest_demo_model  # noqa: E402
from ldm.data.synthetic import ALL_SHAPES, BACKGROUNDS, COLOURS, caption_for, render_scene, sample_scene_facts  # noqa: E402
from ldm.evaluation.pixel_scene_classifier import classify_scene  # noqa: E402
from ldm.evaluation.prompt_adherence import adherence_rates, all_demo_captions  # noqa: E402
from ldm.pipeline import TextToImagePipeline  # noqa: E402

# name: (experiment, overrides). "lora" holds the known shapes with real images, "dreambooth_prior" with the
# base model's generated images; "lora_no_prior" is demo_lora on the crosses alone, nothing holding them.
NO_PRIOR = ["data.synthetic.shapes=[cross]", "data.synthetic.num_train=54", "data.synthetic.samples_per_shard=54",
            "model.optimizer.lr=1e-3", "trainer.max_steps=300", "trainer.val_check_interval=150"]
RUNS = {"lora": ("demo_lora", []), "dreambooth_prior": ("demo_dreambooth", []),
        "lora_no_prior": ("demo_lora", NO_PRIOR)}


def cross_captions() -> list[str]:
    return [caption_for("cross", colour, background) for colour in COLOURS for background in BACKGROUNDS]


def classifier_on_real_scenes(num_scenes: int = 288) -> dict[str, float]:
    """Per-fact accuracy of the pixel classifier on rendered scenes of all four shapes."""
    facts = sample_scene_facts(num_scenes, seed=21, split="benchmark-lora", shapes=ALL_SHAPES)
    found = [classify_scene(render_scene(resolution=32, **scene)) for scene in facts]
    rates = {fact: sum(f[fact] == s[fact] for f, s in zip(found, facts)) / len(facts)
             for fact in ("shape", "colour", "background")}
    crosses = [(f, s) for f, s in zip(found, facts) if s["shape"] == "cross"]
    rates["cross_read_as_cross"] = sum(f["shape"] == "cross" for f, _ in crosses) / len(crosses)
    others = [(f, s) for f, s in zip(found, facts) if s["shape"] != "cross"]
    rates["other_shapes_read_as_cross"] = sum(f["shape"] == "cross" for f, _ in others) / len(others)
    return rates


def measure(pipeline: TextToImagePipeline, images_per_prompt: int, sampler: str, steps: int, seed: int
            ) -> dict[str, dict]:
    """Adherence on the cross prompts and on the base prompts, same sampler and seeds for every model."""
    results = {}
    for name, captions in (("cross_prompts", cross_captions()), ("base_prompts", all_demo_captions())):
        prompts = [caption for caption in captions for _ in range(images_per_prompt)]
        images = pipeline(prompts, height=pipeline.resolution, width=pipeline.resolution, sampler=sampler,
                          num_inference_steps=steps, guidance_scale=DEMO_GUIDANCE_SCALE, seed=[seed + i for i in range(len(prompts))],
                          batch_size=216)
        results[name] = {**adherence_rates(images, prompts), "num_images": len(prompts)}
    return results


def train(experiment: str, overrides: list[str], base: Path, run_dir: Path) -> float:
    """Run train.py for ``experiment`` (plus Hydra ``overrides``) into ``run_dir``; returns its wall time in s."""
    command = [sys.executable, "train.py", f"experiment={experiment}", f"model.mode.pretrained.path={base}",
               "logger=none", f"hydra.run.dir={run_dir}", *overrides]
    environment = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `make test`: busy-waiting threads stall a shared CPU
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds


def trainable_fraction(checkpoint: Path, base: TextToImagePipeline) -> dict[str, float]:
    """Adapter parameters (from the run's checkpoint) over the base U-Net's and the whole model's."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    adapters = sum(v.numel() for k, v in state.items() if k.startswith("network.") and ".lora_" in k)
    unet = sum(p.numel() for p in base.network.parameters())
    whole = unet + sum(p.numel() for p in base.vae.parameters()) + sum(p.numel() for p in base.text_encoder.parameters())
    return {"adapter_parameters": adapters, "unet_parameters": unet, "model_parameters": whole,
            "fraction_of_unet": adapters / unet, "fraction_of_model": adapters / whole}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the demo model folder (default: the newest demo run's)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    # The project's adherence standard (README): DPM-Solver++(2M) at 10 steps, as adherent as DDIM 50.
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=200_000)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/lora.json"))
    parser.add_argument("--trained", action="append", default=[], metavar="NAME=RUN_DIR",
                        help=f"measure this finished run of NAME ({', '.join(RUNS)}) instead of training it")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which runs (default: all)")
    args = parser.parse_args()
    trained = dict(item.split("=", 1) for item in args.trained)
    unknown = sorted(set(trained) - set(RUNS))
    if unknown:
        raise SystemExit(f"--trained {unknown}: the runs are {list(RUNS)}")

    base_path = Path(args.model).resolve() if args.model else newest_demo_model().resolve()
    result: dict = {"base_model": str(base_path), "classifier_on_real_scenes": classifier_on_real_scenes(),
                    "settings": {"images_per_prompt": args.images_per_prompt, "num_inference_steps": args.steps,
                                 "guidance_scale": DEMO_GUIDANCE_SCALE, "first_seed": args.seed, "sampler": args.sampler}}
    base = TextToImagePipeline.from_pretrained(base_path)
    result["base"] = measure(base, args.images_per_prompt, args.sampler, args.steps, args.seed)
    print("base:", json.dumps(result["base"]))
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for name in args.runs:
        experiment, overrides = RUNS[name]
        if name in trained:
            run_dir, seconds = Path(trained[name]).resolve(), None
        else:
            run_dir = ROOT / "outputs" / "benchmarks" / "lora" / f"{stamp}-{name}"
            seconds = train(experiment, overrides, base_path, run_dir)
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        tuned = TextToImagePipeline.from_pretrained(checkpoint)
        measured = measure(tuned, args.images_per_prompt, args.sampler, args.steps, args.seed)
        lora_dir = run_dir / "lora"
        result[name] = {
            "experiment": experiment, "overrides": overrides, "train_wall_seconds": seconds, **measured,
            "base_prompts_all_three_change_points": 100 * (measured["base_prompts"]["all"]
                                                           - result["base"]["base_prompts"]["all"]),
            "lora_file_bytes": {path.name: path.stat().st_size for path in sorted(lora_dir.glob("*.safetensors"))},
            "checkpoint_bytes": checkpoint.stat().st_size,
            "train_steps": torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"],
            **trainable_fraction(checkpoint, base),
        }
        print(f"{name}:", json.dumps(result[name]))
    result["machine"] = machine_info()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"\n{'run':<18}{'train s':>9}{'cross drawn':>13}{'base all-three':>16}{'change (pts)':>14}")
    print(f"{'base':<18}{'':>9}{result['base']['cross_prompts']['shape']:>13.1%}"
          f"{result['base']['base_prompts']['all']:>16.1%}")
    for name in args.runs:
        row = result[name]
        wall = "" if row["train_wall_seconds"] is None else f"{row['train_wall_seconds']:.0f}"
        print(f"{name:<18}{wall:>9}{row['cross_prompts']['shape']:>13.1%}"
              f"{row['base_prompts']['all']:>16.1%}{row['base_prompts_all_three_change_points']:>14.1f}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
