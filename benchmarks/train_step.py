"""Training-step throughput and MFU: ldm's U-Net against diffusers' UNet2DConditionModel, same step, same weights.

One step = what LatentDiffusion does to the U-Net per batch once latents and context exist (the
frozen VAE and text encoder are left out: they cost the same whatever U-Net trains, or nothing
with precomputed latents): draw t and noise, q_sample, forward under autocast, MSE to the noise,
backward, clip the gradient norm to 1, AdamW step. Both models get the same weights (diffusers'
mapped into ldm's layout; outputs checked equal first) and alternate step by step, so the machine's
drifts hit both alike. FLOPs are the U-Net's forward+backward counted once with FlopCounterMode;
MFU = achieved FLOP/s over the device's peak: on GPUs the data-sheet dense bf16 peak (or
--peak-tflops), on the CPU a matmul measured in the same run and precision.

    python benchmarks/train_step.py                          # CPU: the tiny demo U-Net, fp32, and the demo step
    python benchmarks/train_step.py --device cuda            # GPU: tiny and SD 2.x base at 256 px, bf16
    python benchmarks/train_step.py --sizes sd2-base --batch 32 --compile

On the CPU it also times the demo's whole stage-2 step (``demo_step`` in the JSON), four ways over the same
weights and batch, in rounds of one process per way: ldm's step as ``make demo`` runs it (latents drawn from the
precomputed VAE posterior, precomputed text states, channels-last input, the environment ``make demo`` exports),
ldm's step as the demo ran it before (VAE encode and text encoder on every batch, NCHW, passive thread waiting,
GEGLU chunking one projection's output, AveragedModel's EMA update walking both modules), and diffusers' bare
U-Net step in fp32 and bf16. Each ldm step is LatentDiffusion's own loss (min-SNR weighted), backward,
clipping, fused AdamW and EMA.

Writes benchmarks/results/train_step.json (or --output). Target on a GPU: >= 40% MFU for SD 2.x base
at 256 px in bf16, and faster than diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.optim.swa_utils import AveragedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, machine_info, unet_pair  # noqa: E402
from benchmarks.unet import synchronize  # noqa: E402
from ldm.diffusion.objectives import q_sample  # noqa: E402
from ldm.diffusion.schedules import NoiseSchedule  # noqa: E402
from ldm.training.ema import EMAModel, ema_decay_at  # noqa: E402
from ldm.training.throughput import measured_peak_tflops, network_training_flops  # noqa: E402

# Preset (configs/model/network/NAME.yaml), latent side, context tokens, default batch per device type.
SIZES = {
    "tiny": dict(preset="tiny", latent_size=8, tokens=77, batch={"cpu": 64, "cuda": 256}),  # the demo: 32 px, f=4
    "sd2-base": dict(preset="sd2", latent_size=32, tokens=77, batch={"cpu": 1, "cuda": 32}),  # 256 px, f=8
    "sd2-base-512": dict(preset="sd2", latent_size=64, tokens=77, batch={"cpu": 1, "cuda": 8}),  # 512 px, f=8
}
# Dense bf16 tensor-core peaks from the data sheets, TFLOP/s, matched against torch.cuda.get_device_name().
GPU_BF16_PEAK_TFLOPS = [("H200", 989.4), ("H100 80GB HBM3", 989.4), ("H100 SXM", 989.4), ("H100 NVL", 835.0),
                        ("H100 PCIe", 756.0), ("H100", 756.0), ("A100", 312.0), ("L40S", 362.0)]


def preset_arguments(preset: str) -> dict:
    """Keyword arguments of UNetModel from a config preset (without ``_target_``)."""
    config = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/network" / f"{preset}.yaml"))
    config.pop("_target_")
    return config


def build_pair(size: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(ldm UNetModel, diffusers UNet2DConditionModel, ldm config) with the same weights."""
    config = preset_arguments(SIZES[size]["preset"])
    unet, reference = unet_pair(config, SIZES[size]["latent_size"])
    return unet, reference, config


class TrainStep:
    """One U-Net training step (see the module docstring) for ldm (``is_ldm``) or diffusers call conventions."""

    def __init__(self, model: torch.nn.Module, is_ldm: bool, autocast_dtype: torch.dtype | None, device: str,
                 compile_model: bool) -> None:
        self.model = model.train()
        self.forward = torch.compile(model) if compile_model else model
        self.is_ldm = is_ldm
        self.autocast_dtype = autocast_dtype
        self.device = device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
        self.alphas_cumprod = NoiseSchedule("scaled_linear").alphas_cumprod.float().to(device)

    def __call__(self, latents: torch.Tensor, context: torch.Tensor, generator: torch.Generator) -> float:
        t = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), device=self.device, generator=generator)
        noise = torch.randn(latents.shape, device=self.device, generator=generator)
        x_t = q_sample(latents, t, noise, self.alphas_cumprod)
        with torch.autocast(self.device, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            if self.is_ldm:
                prediction = self.forward(x_t, t, context)
            else:
                prediction = self.forward(x_t, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def peak_tflops(device: str, dtype: torch.dtype, given: float | None) -> tuple[float, str]:
    """The MFU reference: given, else the data sheet's bf16 peak of a known GPU, else a measured matmul."""
    if given:
        return given, "given"
    if device == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name()
        for pattern, value in GPU_BF16_PEAK_TFLOPS:
            if pattern in name:
                return value, f"data sheet ({pattern} dense bf16)"
    return measured_peak_tflops(torch.device(device), dtype), f"measured matmul ({dtype})"


def benchmark(size: str, precision: str, args: argparse.Namespace) -> dict:
    device = args.device
    batch = args.batch or SIZES[size]["batch"][device]
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    unet, reference, config = build_pair(size)
    unet, reference = unet.to(device), reference.to(device)
    generator = torch.Generator(device).manual_seed(1)
    side, tokens = SIZES[size]["latent_size"], SIZES[size]["tokens"]
    latents = torch.randn(batch, config["in_channels"], side, side, device=device, generator=generator)
    context = torch.randn(batch, tokens, config["context_dim"], device=device, generator=generator)
    with torch.no_grad():
        probe_t = torch.tensor([10, 500], device=device)
        difference = (unet(latents[:2], probe_t, context[:2])
                      - reference(latents[:2], probe_t, encoder_hidden_states=context[:2]).sample).abs().max()
    flops = network_training_flops(unet, (latents, torch.zeros(batch, dtype=torch.long, device=device), context))
    steps = {"ldm": TrainStep(unet, True, autocast_dtype, device, args.compile),
             "diffusers": TrainStep(reference, False, autocast_dtype, device, args.compile)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(args.warmup + args.steps):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step(latents, context, generator)
            synchronize(device)
            if index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    peak, peak_source = peak_tflops(device, autocast_dtype or torch.float32, args.peak_tflops)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    row = {"size": size, "precision": precision, "batch": batch, "latent_shape": list(latents.shape[1:]),
           "context_shape": list(context.shape[1:]), "params": sum(p.numel() for p in unet.parameters()),
           "max_abs_output_difference_fp32": float(difference), "unet_train_flops_per_step": flops,
           "peak_tflops": peak, "peak_source": peak_source, "seconds_per_step": seconds,
           "images_per_s": {name: batch / s for name, s in seconds.items()},
           "tflops": {name: flops / s / 1e12 for name, s in seconds.items()},
           "mfu": {name: flops / s / 1e12 / peak for name, s in seconds.items()},
           "speedup_ldm_over_diffusers": seconds["diffusers"] / seconds["ldm"]}
    print(f"{size:9} {precision:5} {batch:5d} {row['images_per_s']['ldm']:10.1f} {row['images_per_s']['diffusers']:10.1f} "
          f"{row['speedup_ldm_over_diffusers']:7.2f} {row['tflops']['ldm']:9.3f} {100 * row['mfu']['ldm']:7.1f}% "
          f"{100 * row['mfu']['diffusers']:7.1f}%  (peak {peak:.2f} TFLOP/s, {peak_source})")
    return row


def demo_module(channels_last: bool) -> torch.nn.Module:
    """The demo's LatentDiffusion (``experiment=demo``, random VAE: its cost is the trained one's)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ldm.config import instantiate_module

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "model.latents.vae_weights=null", "model.latents.scale_factor=0.5",
                                          f"model.latents.channels_last={channels_last}"])
    return instantiate_module(cfg.model).train()


class DemoStep:
    """One stage-2 step of the demo module: latents and context (from images and captions, or precomputed),
    its weighted diffusion loss, backward, gradient-norm clipping at 1 over the optimizer's parameters (as
    ``configure_gradient_clipping`` clips), its optimizer (fused AdamW), the EMA update (``ema_update``, by
    default the module's own)."""

    def __init__(self, module: torch.nn.Module, precomputed: bool,
                 ema_update: Callable[[torch.nn.Module], None] | None = None) -> None:
        self.module = module
        self.precomputed = precomputed
        self.optimizer = module.configure_optimizers()["optimizer"]
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.ema_update = ema_update or module.ema_network.update_parameters

    def __call__(self, batch: dict, generator: torch.Generator) -> float:
        module = self.module
        if self.precomputed:
            latents, context = module.batch_latents(batch), module.batch_conditioning(batch)
        else:
            latents, context = module.encode_images(batch["image"]), module.conditioning(batch["caption"])
        loss = module.diffusion_loss(latents, context)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema_update(module.network)
        return loss.detach()


def averaged_model_update(ema: EMAModel) -> Callable[[torch.nn.Module], None]:
    """The EMA update as it ran before this issue: ``AveragedModel.update_parameters`` with a foreach lerp,
    which walks both modules' parameters and buffers on every update."""

    def lerp(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - ema_decay_at(int(num_averaged), ema.decay, ema.warmup_steps))

    ema.multi_avg_fn = lerp
    return lambda model: AveragedModel.update_parameters(ema, model)


def make_demo_environment(makefile: Path = ROOT / "Makefile") -> dict[str, str]:
    """The variables ``make demo`` exports (its ``demo: export NAME ?= VALUE`` lines), as the demo runs."""
    pattern = re.compile(r"^demo: export (\w+) \?= (\S+)\s*$")
    return dict(match.groups() for line in makefile.read_text().splitlines() if (match := pattern.match(line)))


# The environment each demo-step arm's process starts with. libgomp reads its wait policy and glibc its malloc
# tunables once, at start, so each arm runs in processes of its own. Before this issue `make demo` exported
# passive waiting (OpenMP threads sleep at once between parallel regions) and nothing else; now it exports
# what ``make_demo_environment`` reads. diffusers' steps run in ldm's current environment.
DEMO_ENVIRONMENT = make_demo_environment()
DEMO_ARM_ENVIRONMENTS = {"ldm demo now": DEMO_ENVIRONMENT, "ldm demo before": {"OMP_WAIT_POLICY": "PASSIVE"},
                         "diffusers fp32": DEMO_ENVIRONMENT, "diffusers bf16": DEMO_ENVIRONMENT}
# Variables of the calling shell that would change an arm's environment.
ARM_ENVIRONMENT_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GLIBC_TUNABLES")


class CalledProjection(torch.nn.Module):
    """Wraps GEGLU's projection so GEGLU calls it as a module and chunks its output, as before this issue."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def demo_arm_step(arm: str, batch_size: int) -> Callable[[torch.Generator], float]:
    """One arm of the demo-step table, ready to run: ldm's demo step now or before, or diffusers' bare U-Net step.

    Every arm gets the same U-Net weights (``build_pair``'s seeded ones) and the same batch of built-in
    scenes: pixels (B, 3, 32, 32) and captions, or what ``data=demo_latents`` stores for them."""
    from ldm.data.synthetic import caption_for, render_scene, sample_scene_facts
    from ldm.models.attention import GEGLU

    unet, reference, config = build_pair("tiny")
    module = demo_module(channels_last=arm == "ldm demo now")
    module.network.load_state_dict(unet.state_dict())
    module.ema_network.module.load_state_dict(unet.state_dict())
    facts = sample_scene_facts(batch_size, seed=0, split="train")
    pixels = torch.stack([torch.from_numpy(np.array(render_scene(resolution=32, **f))).float()
                          for f in facts]).permute(0, 3, 1, 2) / 127.5 - 1
    captions = [caption_for(f["shape"], f["colour"], f["background"]) for f in facts]
    with torch.no_grad():  # what data=demo_latents stores: the posterior and the text states, once
        posterior = module.vae.encode(pixels)
        stored = {"latent_mean": posterior.mean, "latent_std": posterior.std,
                  "text_states": module.conditioning(captions).tokens, "caption": captions}
    if arm == "ldm demo now":
        step = DemoStep(module, precomputed=True)
        return lambda generator: step(stored, generator)
    if arm == "ldm demo before":
        for geglu in [m for m in module.network.modules() if isinstance(m, GEGLU)]:
            geglu.proj = CalledProjection(geglu.proj)
        step = DemoStep(module, precomputed=False, ema_update=averaged_model_update(module.ema_network))
        images = {"image": pixels, "caption": captions}
        return lambda generator: step(images, generator)
    bare = TrainStep(reference, False, torch.bfloat16 if arm == "diffusers bf16" else None, "cpu", False)
    latents = stored["latent_mean"] * module.latent_scale_factor
    return lambda generator: bare(latents, stored["text_states"], generator)


def run_demo_arm(arm: str, args: argparse.Namespace) -> list[float]:
    """Times ``arm`` for --warmup + --steps steps in this process; returns the timed steps' seconds."""
    step = demo_arm_step(arm, args.batch or SIZES["tiny"]["batch"]["cpu"])
    generator = torch.Generator().manual_seed(1)
    seconds = []
    for index in range(args.warmup + args.steps):
        start = time.perf_counter()
        step(generator)
        if index >= args.warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def benchmark_demo_step(args: argparse.Namespace) -> dict:
    """The demo's stage-2 step now and before, beside diffusers' U-Net step in fp32 and bf16 (CPU).

    Each round runs every arm once, each in a fresh process with its environment
    (``DEMO_ARM_ENVIRONMENTS``), so the machine's drifts hit all arms alike; the speedup is the median of the
    rounds' ratios, each of the two ldm arms' medians within one round."""
    batch_size = args.batch or SIZES["tiny"]["batch"]["cpu"]
    rounds: dict[str, list[list[float]]] = {arm: [] for arm in DEMO_ARM_ENVIRONMENTS}  # seconds per step, per round
    for _ in range(args.demo_rounds):
        for arm, overrides in DEMO_ARM_ENVIRONMENTS.items():
            environment = {k: v for k, v in os.environ.items() if k not in ARM_ENVIRONMENT_KEYS}
            command = [sys.executable, __file__, "--demo-arm", arm, "--batch", str(batch_size),
                       "--steps", str(args.steps), "--warmup", str(args.warmup)]
            result = subprocess.run(command, env={**environment, **overrides}, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"demo arm {arm!r} failed:\n{result.stderr[-3000:]}")
            rounds[arm].append(json.loads(result.stdout.strip().splitlines()[-1]))
    seconds = {arm: statistics.median([s for one in per_round for s in one]) for arm, per_round in rounds.items()}
    round_medians = {arm: [statistics.median(one) for one in per_round] for arm, per_round in rounds.items()}
    # The host's speed drifts by more than the change between minutes; the two ldm arms of one round run
    # minutes apart at most, so the ratio within each round is the paired estimate, its median the headline.
    round_speedups = [before / now
                      for before, now in zip(round_medians["ldm demo before"], round_medians["ldm demo now"])]
    result = {"batch": batch_size, "rounds": args.demo_rounds, "steps_per_round": args.steps,
              "environments": DEMO_ARM_ENVIRONMENTS, "seconds_per_step": seconds,
              "round_median_seconds_per_step": round_medians,
              "images_per_s": {arm: batch_size / s for arm, s in seconds.items()},
              "round_speedups_now_over_before": round_speedups,
              "speedup_now_over_before": statistics.median(round_speedups),
              "pooled_speedup_now_over_before": seconds["ldm demo before"] / seconds["ldm demo now"]}
    print(f"\nThe demo's stage-2 step, batch {batch_size} (median of {args.demo_rounds} rounds x {args.steps} steps):")
    for arm, value in seconds.items():
        print(f"  {arm:16} {1000 * value:8.1f} ms  {batch_size / value:8.1f} img/s  {' '.join(DEMO_ARM_ENVIRONMENTS[arm])}")
    print(f"  now / before, per round: {' '.join(f'{ratio:.2f}x' for ratio in round_speedups)}; "
          f"median {result['speedup_now_over_before']:.2f}x (pooled medians: "
          f"{result['pooled_speedup_now_over_before']:.2f}x)")
    return result


def cpu_name() -> str:
    """The CPU's model name and the threads torch uses."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None,
                        help="default: tiny on the CPU; tiny and sd2-base on CUDA")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None,
                        help="default: fp32 and bf16 on the CPU; bf16 on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="per step (default: per size and device)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU")
    parser.add_argument("--no-demo-step", action="store_true", help="on the CPU, skip the demo-step table")
    parser.add_argument("--demo-rounds", type=int, default=5, help="demo-step rounds (each arm a process per round)")
    parser.add_argument("--demo-arm", choices=list(DEMO_ARM_ENVIRONMENTS), default=None,
                        help="internal: time one demo-step arm in this process and print its seconds as JSON")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/train_step.json"))
    args = parser.parse_args()
    if args.demo_arm:
        print(json.dumps(run_demo_arm(args.demo_arm, args)))
        return
    sizes = args.sizes or (["tiny"] if args.device == "cpu" else ["tiny", "sd2-base"])
    # On the CPU, bf16 autocast was measured ~30x slower than fp32 for the tiny U-Net (op overheads).
    precisions = args.precisions or (["fp32"] if args.device == "cpu" else ["bf16"])
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"\nU-Net training step, ldm vs diffusers, same weights and batch, on {device_name}"
          f"{' (compiled)' if args.compile else ''}\n")
    print(f"{'size':9} {'prec':5} {'batch':>5} {'ldm img/s':>10} {'diff img/s':>10} {'speedup':>7} "
          f"{'ldm TF/s':>9} {'ldm MFU':>8} {'diff MFU':>8}")
    rows = [benchmark(size, precision, args) for size in sizes for precision in precisions]
    demo_step = benchmark_demo_step(args) if args.device == "cpu" and not args.no_demo_step else None
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    output.write_text(json.dumps({"device": device_name, "compile": args.compile, "steps": args.steps,
                                  "rows": rows, "demo_step": demo_step, "load_average": load,
                                  "machine": machine_info()}, indent=2))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
