"""What the benchmark scripts share: finding the trained demo model, real images, and the machine's description."""

from __future__ import annotations

import argparse
import glob
import os
import platform
from pathlib import Path

from typing import Any

import torch

from ldm.interchange.build import constructor_arguments
from ldm.evaluation.reference import read_image_caption_set
from ldm.interchange.diffusers_configs import unet_config
from ldm.interchange.diffusers_keys import diffusers_unet_to_ldm
from ldm.models.unet import UNetModel

ROOT = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINTS = str(ROOT / "outputs/train/demo/*/checkpoints/last.ckpt")
DEMO_MODELS = str(ROOT / "outputs/train/demo/*/model")
# The demo's guidance scale (also the sample grid's, configs/callbacks/diffusion.yaml). Measured on demo
# checkpoints: shape adherence falls as guidance rises past 2 (2: 97%, 3: 92%, 5: 83%, 7.5: 79%), the
# shapes turning pinched and star-like, while colour stays at 100%.
DEMO_GUIDANCE_SCALE = 2.0


def demo_sampling_parser(description: str, images_per_prompt: int, seed: int,
                         output_name: str | None) -> argparse.ArgumentParser:
    """The options every benchmark that samples the demo model takes; scripts add their own. ``output_name``
    None: the script writes into the model's run folder unless ``--output`` is given."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--ckpt", dest="model", default=None,
                        help="a model folder, SD file or training checkpoint (default: the newest demo run's model/)")
    parser.add_argument("--images-per-prompt", type=int, default=images_per_prompt)
    parser.add_argument("--guidance-scale", type=float, default=DEMO_GUIDANCE_SCALE)
    parser.add_argument("--seed", type=int, default=seed, help="first seed; held out from the training grid's seeds")
    parser.add_argument("--batch-size", type=int, default=216)
    parser.add_argument("--val-shards", default=None, help="real images (default: the built-in val set)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results" / output_name) if output_name else None)
    return parser


def newest_checkpoint(pattern: str = DEMO_CHECKPOINTS) -> Path:
    """The most recently written checkpoint matching a glob pattern."""
    matches = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not matches:
        raise SystemExit(f"no checkpoint matches {pattern}; train one first (make demo) or pass --model")
    return Path(matches[-1])


def newest_demo_model() -> Path:
    """The newest demo run's model folder (written at the end of training), else its last.ckpt."""
    return newest_checkpoint(DEMO_MODELS) if glob.glob(DEMO_MODELS) else newest_checkpoint()


def run_folder(model: Path) -> Path:
    """The run folder a model lies in: ``<run>/model`` or ``<run>/checkpoints/<name>.ckpt``."""
    model = model.resolve()
    return model.parent.parent if model.parent.name == "checkpoints" else model.parent


def default_val_shards(resolution: int) -> str | None:
    """The built-in data set's validation shards at ``resolution``, or None where it was not generated."""
    matches = sorted(glob.glob(str(ROOT / f"data/synthetic-{resolution}px-*/val-*.tar")))
    return matches[0] if matches else None


def real_images(shards: str, resolution: int, limit: int) -> tuple[torch.Tensor, list[str]]:
    """Up to ``limit`` real images (N, 3, resolution, resolution) in [0, 1] and their captions."""
    try:
        return read_image_caption_set(shards, resolution, limit)
    except ValueError as error:
        raise SystemExit(str(error)) from error


def unet_pair(unet_arguments: dict[str, Any], latent_size: int) -> tuple[UNetModel, torch.nn.Module]:
    """(ldm UNetModel, diffusers UNet2DConditionModel) of the same network with the same weights.

    ``unet_arguments``: UNetModel's (the rest take its defaults). diffusers' configuration comes from
    them through export's own mapping (``ldm.interchange.diffusers_configs.unet_config``); its weights are
    converted into ldm's layout, so the strict load checks that the two networks are the same.
    """
    import diffusers  # only benchmarks and tests use diffusers

    arguments = constructor_arguments({"_target_": f"{UNetModel.__module__}.{UNetModel.__name__}", **unet_arguments})
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel.from_config(unet_config(arguments, latent_size))
    with torch.no_grad():  # perturb every weight, so zero-initialised output layers cannot hide a difference
        for parameter in reference.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    unet = UNetModel(**arguments)
    unet.load_state_dict(diffusers_unet_to_ldm(reference.state_dict(), arguments["num_res_blocks"]), strict=True)
    return unet, reference


def machine_info() -> dict:
    """The machine a benchmark ran on, for its JSON result."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
