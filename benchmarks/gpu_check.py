"""One-shot GPU check: everything a GPU should prove about ldm, in one run of at most a few minutes.

Sections, in order of value (each timed and guarded: a failure is recorded and the next section runs;
the JSON is rewritten after every section, so a run cut short still leaves its figures):

1. ``cuda_tests``: the tests skipped elsewhere with "needs a CUDA device".
2. ``train_step_256`` / ``train_step_256_compiled``: ``benchmarks/train_step.py`` for the SD 2.x base U-Net at
   256 px in bf16 against diffusers' UNet2DConditionModel, eager and torch.compiled, MFU against the data sheet.
3. ``unet_memory``: the U-Net forward+backward memory peak beyond the weights, ldm against diffusers.
4. ``pipeline_512``: ``benchmarks/sampling.py`` images/s of ldm's pipeline against diffusers' on a random-weight
   SD 2.x base model (U-Net, VAE, ViT-H text tower) at 512 px, DPM-Solver++ 20 steps.
5. ``train_step_512`` / ``train_step_512_compiled``: as 2 at 512 px.
6. ``training_run``: ``train.py`` for 50 bf16 steps of the demo's small model (random frozen VAE); the loss must fall.

A section starts only while the total time cap leaves room for it. Packages the GPU machine lacks come from
wheels in ``.whl/`` (``benchmarks/gpu_wheels.py`` fetches them); they are installed into a temporary folder.
``--dry-run`` runs the same sections on the CPU with tiny sizes (compiled sections skipped: their compile time
alone exceeds a test's budget), so the script is exercised by the tests.

    python benchmarks/gpu_check.py                 # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --dry-run       # on the CPU, tiny sizes (make gpu-check DRY_RUN=1)

Writes benchmarks/results/gpu_check.json (dry run: gpu_check_dry_run.json), naming the device.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
# Modules the GPU machine lacks; their wheels are installed when any of them is missing.
NEEDED_MODULES = ("hydra", "omegaconf", "antlr4", "open_clip", "ftfy", "webdataset", "braceexpand", "diffusers")
CUDA_ONLY_REASON = "needs a CUDA device"

# Per mode: device, train_step.py arguments per resolution, memory batch, pipeline model and call, training run.
SETTINGS = {
    "gpu": {
        "device": "cuda", "time_limit_s": 450,
        "train_step": {256: ["--sizes", "sd2-base", "--batch", "32"], 512: ["--sizes", "sd2-base-512", "--batch", "8"]},
        "train_step_common": ["--precisions", "bf16", "--steps", "10", "--warmup", "3"],
        "memory": {"size": "sd2-base", "batch": 8},
        "pipeline": {"model": "sd2-base", "resolution": 512, "steps": 20, "batch": 8, "repeats": 3, "dtype": "bf16"},
        "training": {"steps": 50, "batch": 64, "trainer": "gpu"},
    },
    "dry_run": {
        "device": "cpu", "time_limit_s": 600,  # a shared CPU under load: generous
        "train_step": {256: ["--sizes", "tiny", "--batch", "2"]},
        "train_step_common": ["--precisions", "bf16", "--steps", "1", "--warmup", "0", "--demo-rounds", "1"],
        "memory": {"size": "tiny", "batch": 2},
        "pipeline": {"model": "tiny", "resolution": 32, "steps": 2, "batch": 1, "repeats": 1, "dtype": "fp32"},
        "training": {"steps": 4, "batch": 4, "trainer": "cpu"},
    },
}
# Random-weight models for the pipeline section: component configs (configs/model/...) and the text tower.
VIT_H_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24, "output_dim": 1024}
PIPELINE_MODELS = {
    "sd2-base": {"unet": "network/sd2.yaml", "vae": "vae/sd.yaml", "latent_scale_factor": 0.18215,
                 "text_encoder": {"_target_": "ldm.models.text_encoders.FrozenOpenCLIPTextEncoder", "text_cfg": VIT_H_TEXT,
                                  "layer": "penultimate", "tokenizer_name": "ViT-H-14", "seed": 0}},
    "tiny": {"unet": "network/tiny.yaml", "vae": "vae/tiny.yaml", "latent_scale_factor": 0.7,
             "text_encoder": "text_encoder/tiny.yaml"},
}


class Report:
    """The check's JSON, rewritten after every section; sections are timed, guarded and held to a total cap."""

    def __init__(self, output: Path, time_limit_s: float, header: dict) -> None:
        self.output = output
        self.deadline = time.monotonic() + time_limit_s
        self.data = {**header, "time_limit_s": time_limit_s, "sections": {}}
        self.write()

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.output.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str))
        temporary.replace(self.output)

    def run(self, name: str, function: Callable[[float], dict], minimum_s: float) -> None:
        """Run ``function(seconds_left)`` as section ``name`` if at least ``minimum_s`` of the cap remain."""
        left = self.remaining_s()
        if left < minimum_s:
            self.data["sections"][name] = {"status": "skipped", "reason": f"time cap: {left:.0f} s left"}
        else:
            print(f"\n=== {name} ({left:.0f} s left)", flush=True)
            start = time.monotonic()
            try:
                result = {"status": "ok", **function(left)}
            except Exception as error:  # noqa: BLE001 -- one section's failure must not stop the others
                result = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc()[-4000:]}
            result["seconds"] = round(time.monotonic() - start, 1)
            self.data["sections"][name] = result
            print(f"=== {name}: {result['status']} in {result['seconds']} s", flush=True)
        self.write()


def install_wheels(target: Path) -> list[str]:
    """Install ``.whl/*.whl`` into ``target`` when a needed module is missing; returns the wheels installed."""
    missing = [name for name in NEEDED_MODULES if importlib.util.find_spec(name) is None]
    wheels = sorted(WHEELS.glob("*.whl"))
    if not missing or not wheels:
        return []
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(target),
               *map(str, wheels)]
    if subprocess.run(command).returncode != 0:
        # Without pip a wheel is still a zip of the files to put on the path (no scripts needed here).
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
    return [wheel.name for wheel in wheels]


def run_program(arguments: list[str], timeout_s: float, env: dict) -> subprocess.CompletedProcess:
    """Run a Python program of the repository, echoing its output; raise with its tail if it fails."""
    print("$ python " + " ".join(arguments), flush=True)
    result = subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=max(timeout_s, 1))
    print(result.stdout[-3000:], result.stderr[-2000:], sep="\n", flush=True)
    if result.returncode != 0:
        raise RuntimeError(f"exit status {result.returncode}: {result.stderr[-1500:] or result.stdout[-1500:]}")
    return result


def cuda_only_tests() -> list[str]:
    """Node ids of the tests marked to skip without CUDA: the test function after each such skip mark."""
    pattern = re.compile(rf"skipif\([^\n]*{CUDA_ONLY_REASON}[^\n]*\)\s*\n(?:@[^\n]*\n)*def (test_\w+)")
    node_ids = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        node_ids += [f"{path.relative_to(ROOT)}::{name}" for name in pattern.findall(path.read_text())]
    return node_ids


def section_cuda_tests(env: dict, work: Path) -> Callable[[float], dict]:
    def run(left: float) -> dict:
        node_ids = cuda_only_tests()
        if not node_ids:
            raise RuntimeError(f"no test is marked {CUDA_ONLY_REASON!r}")
        junit = work / "cuda_tests.xml"
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                                 *node_ids], cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
        print(result.stdout[-3000:], flush=True)
        suite = ElementTree.parse(junit).getroot().iter("testsuite").__next__()
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        if result.returncode not in (0,) or counts["failures"] or counts["errors"]:
            raise RuntimeError(f"pytest exit status {result.returncode}, {counts}: {result.stdout[-1500:]}")
        return {"tests": node_ids, **counts}
    return run


def section_train_step(settings: dict, resolution: int, compiled: bool, env: dict, work: Path
                       ) -> Callable[[float], dict]:
    def run(left: float) -> dict:
        output = work / f"train_step_{resolution}{'_compiled' if compiled else ''}.json"
        arguments = ["benchmarks/train_step.py", "--device", settings["device"], *settings["train_step"][resolution],
                     *settings["train_step_common"], *(["--compile"] if compiled else []), "--output", str(output)]
        run_program(arguments, left, env)
        return json.loads(output.read_text())
    return run


def section_memory(settings: dict) -> Callable[[float], dict]:
    def run(left: float) -> dict:
        import torch

        sys.path.insert(0, str(ROOT))
        from benchmarks.train_step import SIZES, build_pair
        from benchmarks.unet import step_memory_mib

        size, batch, device = settings["memory"]["size"], settings["memory"]["batch"], settings["device"]
        unet, reference, config = build_pair(size)
        side = SIZES[size]["latent_size"]
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, config["in_channels"], side, side, generator=generator).to(device)
        t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        context = torch.randn(batch, SIZES[size]["tokens"], config["context_dim"], generator=generator).to(device)
        memory = {}
        for name, model in (("ldm", unet), ("diffusers", reference)):
            model.to(device).train()
            with torch.autocast(device, dtype=torch.bfloat16):
                step_memory_mib(model, name == "ldm", x, t, context, device)  # warm-up: workspaces, kernels
                memory[name] = step_memory_mib(model, name == "ldm", x, t, context, device)
            model.to("cpu")
        return {"size": size, "batch": batch, "latent_shape": list(x.shape[1:]), "precision": "bf16 autocast",
                "peak_step_memory_mib": memory, "memory_ratio_ldm_over_diffusers": memory["ldm"] / memory["diffusers"]}
    return run


def write_random_model(name: str, folder: Path) -> Path:
    """A diffusers folder of random weights for the components of ``PIPELINE_MODELS[name]``."""
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT))
    from ldm.diffusion.schedules import NoiseSchedule
    from ldm.interchange.build import build, constructor_arguments
    from ldm.interchange.diffusers_folder import write_diffusers_folder

    spec = PIPELINE_MODELS[name]
    configs = {part: OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model" / spec[part]))
               if isinstance(spec[part], str) else dict(spec[part]) for part in ("unet", "vae", "text_encoder")}
    torch.manual_seed(0)
    parts = {part: build(config) for part, config in configs.items()}
    return write_diffusers_folder(
        folder, parts["unet"].state_dict(), constructor_arguments(configs["unet"]), parts["vae"].state_dict(),
        constructor_arguments(configs["vae"]), parts["text_encoder"], NoiseSchedule("scaled_linear"), "epsilon",
        spec["latent_scale_factor"])


def section_pipeline(settings: dict, env: dict, work: Path) -> Callable[[float], dict]:
    def run(left: float) -> dict:
        pipeline = settings["pipeline"]
        started = time.monotonic()
        folder = write_random_model(pipeline["model"], work / f"model-{pipeline['model']}")
        written_s = time.monotonic() - started
        output = work / "sampling.json"
        run_program(["benchmarks/sampling.py", "--model", str(folder), "--sampler", "dpmpp_2m",
                     "--steps", str(pipeline["steps"]), "--batch", str(pipeline["batch"]),
                     "--resolution", str(pipeline["resolution"]), "--repeats", str(pipeline["repeats"]),
                     "--device", settings["device"], "--dtype", pipeline["dtype"], "--output", str(output)],
                    left - written_s, env)
        return {"model": f"{pipeline['model']} (random weights)", "model_written_s": round(written_s, 1),
                **json.loads(output.read_text())}
    return run


def section_training(settings: dict, env: dict, work: Path) -> Callable[[float], dict]:
    def run(left: float) -> dict:
        training = settings["training"]
        steps = training["steps"]
        run_dir = work / "train_run"
        run_program([
            "train.py", "experiment=demo", f"trainer={training['trainer']}", "trainer.precision=bf16-mixed",
            "logger=csv", "callbacks=default", "model.latents.vae_weights=null", "model.latents.scale_factor=0.7",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1",
            "trainer.max_time=null", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            f"model.lr_schedule.warmup_steps={max(steps // 5, 1)}", f"data.batch_size={training['batch']}",
            f"data.val_batch_size={training['batch']}", "data.num_workers=0",
            f"data.synthetic.num_train={max(training['batch'] * 8, 64)}", "data.synthetic.num_val=16",
            "data.synthetic.samples_per_shard=64", f"hydra.run.dir={run_dir}",
        ], left, {**env, "LDM_ROOT": str(work / "ldm_root")})
        (metrics,) = run_dir.rglob("metrics.csv")
        losses = [float(row["train/loss"]) for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
        window = max(len(losses) // 5, 1)
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        result = {"steps": steps, "batch": training["batch"], "precision": "bf16-mixed", "losses": losses,
                  "first_mean": first, "last_mean": last, "loss_fell": last < first}
        if settings["device"] == "cuda" and not last < first:
            raise RuntimeError(f"the loss did not fall: mean of the first {window} steps {first:.4f}, "
                               f"of the last {window} {last:.4f}")
        return result
    return run


def device_header(device: str) -> dict:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with tiny sizes, to test the script")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for all sections (default: per mode)")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/gpu_check[_dry_run].json")
    args = parser.parse_args()
    mode = "dry_run" if args.dry_run else "gpu"
    settings = SETTINGS[mode]
    output = Path(args.output or ROOT / "benchmarks/results" / f"gpu_check{'_dry_run' if args.dry_run else ''}.json")
    work = Path(tempfile.mkdtemp(prefix="ldm-gpu-check-"))
    site = work / "site"
    installed = install_wheels(site)
    path = [str(ROOT), *([str(site)] if installed else []), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)), HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    sys.path[:0] = path[:-1]
    import torch

    if settings["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or use --dry-run on the CPU")
    report = Report(output, args.time_limit or settings["time_limit_s"],
                    {"mode": mode, **device_header(settings["device"]), "wheels_installed": installed,
                     "work_dir": str(work)})
    report.run("cuda_tests", section_cuda_tests(env, work), minimum_s=10)
    report.run("train_step_256", section_train_step(settings, 256, False, env, work), minimum_s=30)
    if mode == "gpu":
        report.run("train_step_256_compiled", section_train_step(settings, 256, True, env, work), minimum_s=120)
    report.run("unet_memory", section_memory(settings), minimum_s=20)
    report.run("pipeline_512", section_pipeline(settings, env, work), minimum_s=60)
    if mode == "gpu":
        report.run("train_step_512", section_train_step(settings, 512, False, env, work), minimum_s=40)
    report.run("training_run", section_training(settings, env, work), minimum_s=30)
    if mode == "gpu":
        report.run("train_step_512_compiled", section_train_step(settings, 512, True, env, work), minimum_s=120)
    statuses = {name: section["status"] for name, section in report.data["sections"].items()}
    report.data["passed"] = all(status == "ok" for status in statuses.values())
    report.write()
    print(f"\n{statuses}\nwrote {output}")
    sys.exit(0 if report.data["passed"] else 1)


if __name__ == "__main__":
    main()
