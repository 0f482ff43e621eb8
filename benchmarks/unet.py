"""ldm's U-Net against diffusers' UNet2DConditionModel of the same configuration: speed and memory.

For each size, both models get the same weights (diffusers' converted into ldm's layout, so their
outputs are checked equal first) and the same batch. Forward+backward steps of the two alternate,
so the machine's drifts hit both alike; the table gives median seconds per step and the ratio.
Memory of one step: on CUDA the allocator's peak beyond the weights; on the CPU the activations
autograd saves for the backward pass.

    python benchmarks/unet.py [--sizes small medium] [--steps 10] [--device cpu|cuda]

Writes benchmarks/results/unet.json. Target: ldm no slower (ratio <= 1) and no larger.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, machine_info, unet_pair  # noqa: E402

# Two sizes that fit a 2-core CPU: an SD-1-style U-Net at a quarter of SD's width, and one at half
# width with SD's four levels. Latents 32x32 (256-pixel images), 77 context tokens.
SIZES = {
    "small": dict(model_channels=64, channel_mult=(1, 2, 4), attention_resolutions=(1, 2), num_heads=4,
                  context_dim=256, batch=4),
    "medium": dict(model_channels=160, channel_mult=(1, 2, 4, 4), attention_resolutions=(1, 2, 4), num_heads=8,
                   context_dim=768, batch=2),
}
LATENT_SIZE, CONTEXT_TOKENS = 32, 77


def build_pair(size: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ldm UNetModel, diffusers UNet2DConditionModel) of one configuration, with the same weights."""
    return unet_pair({key: value for key, value in SIZES[size].items() if key != "batch"}, LATENT_SIZE)


def inputs(size: str, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = SIZES[size]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(config["batch"], 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    t = torch.randint(0, 1000, (config["batch"],), generator=generator)
    context = torch.randn(config["batch"], CONTEXT_TOKENS, config["context_dim"], generator=generator)
    return x.to(device), t.to(device), context.to(device)


def step(model: torch.nn.Module, is_ldm: bool, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
    """One forward and backward pass."""
    out = model(x, t, context) if is_ldm else model(x, t, encoder_hidden_states=context).sample
    out.square().mean().backward()
    model.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_memory_mib(model: torch.nn.Module, is_ldm: bool, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    device: str) -> float:
    """Memory one training step needs beyond the weights, in MiB.

    On CUDA: the allocator's peak over what was allocated before. On the CPU, where no allocator
    keeps a peak, the activations autograd saves for the backward pass (distinct storages, weights
    excluded), which is what dominates a step's memory.
    """
    if device == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(model, is_ldm, x, t, context)
        synchronize(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(model, is_ldm, x, t, context)
    return sum(saved.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/unet.json"))
    args = parser.parse_args()
    rows = []
    print(f"\nU-Net forward+backward, ldm vs diffusers, same weights and batch, on {args.device}\n")
    print(f"{'size':8} {'params':>8} {'batch':>5} {'ldm s':>8} {'diffusers s':>11} {'ratio':>6} "
          f"{'ldm MiB':>8} {'diffusers MiB':>13} {'ratio':>6}")
    for size in args.sizes:
        unet, reference = build_pair(size)
        unet, reference = unet.to(args.device), reference.to(args.device)
        x, t, context = inputs(size, args.device)
        with torch.no_grad():
            max_difference = (unet(x, t, context) - reference(x, t, encoder_hidden_states=context).sample).abs().max()
        times: dict[str, list[float]] = {"ldm": [], "diffusers": []}
        for index in range(args.steps + 2):
            for which, model in (("ldm", unet), ("diffusers", reference)):
                synchronize(args.device)
                start = time.perf_counter()
                step(model, which == "ldm", x, t, context)
                synchronize(args.device)
                if index >= 2:
                    times[which].append(time.perf_counter() - start)
        seconds = {which: statistics.median(values) for which, values in times.items()}
        memory = {which: step_memory_mib(model, which == "ldm", x, t, context, args.device)
                  for which, model in (("ldm", unet), ("diffusers", reference))}
        params = sum(p.numel() for p in unet.parameters())
        row = {"size": size, "config": SIZES[size], "params": params, "max_abs_output_difference": float(max_difference),
               "seconds_per_step": seconds, "time_ratio_ldm_over_diffusers": seconds["ldm"] / seconds["diffusers"],
               "peak_step_memory_mib": memory,
               "memory_ratio_ldm_over_diffusers": memory["ldm"] / memory["diffusers"]}
        rows.append(row)
        print(f"{size:8} {params / 1e6:7.1f}M {SIZES[size]['batch']:5d} {seconds['ldm']:8.3f} "
              f"{seconds['diffusers']:11.3f} {row['time_ratio_ldm_over_diffusers']:6.2f} {memory['ldm']:8.0f} "
              f"{memory['diffusers']:13.0f} {row['memory_ratio_ldm_over_diffusers']:6.2f}")
        del unet, reference

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"device": args.device, "steps": args.steps, "rows": rows,
                                  "machine": machine_info()}, indent=2))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
