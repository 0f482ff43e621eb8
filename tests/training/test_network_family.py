"""docs/architecture.md's "Adding a network family", followed step by step: a family of a few convolutions, added
by a module and a config alone, trains 5 steps through train.py and samples through from_pretrained."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from ldm.checkpoints import save_weights
from tests.docs.commands import bash_blocks

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
FAMILY_MODULE = "conv_denoiser"
# The built-in set at a size for a test (the doc's command trains on the demo's full set).
SMALL_DATA = ["data.synthetic.num_train=64", "data.synthetic.num_val=16", "data.synthetic.samples_per_shard=32",
              "data.batch_size=8", "data.val_batch_size=8", "data.num_workers=0", "logger=none",
              "trainer.limit_val_batches=1", "trainer.max_time=null"]


def section(markdown: str, title: str) -> str:
    start = markdown.index(f"## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end > 0 else None]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_a_family_added_by_a_module_and_a_config_trains_and_samples(tmp_path):
    steps = section(DOC.read_text(), "Adding a network family")
    # Steps 1-2: the module and the config exist, and nothing in training or the pipeline names the family.
    assert (ROOT / "ldm" / "models" / f"{FAMILY_MODULE}.py").is_file()
    assert (ROOT / "configs" / "model" / "network" / f"{FAMILY_MODULE}.yaml").is_file()
    for path in [ROOT / "ldm" / "pipeline.py", *sorted((ROOT / "ldm" / "training").glob("*.py")),
                 *sorted((ROOT / "ldm" / "interchange").glob("*.py"))]:
        assert FAMILY_MODULE not in path.read_text() and "ConvDenoiser" not in path.read_text(), path

    # Step 3: the documented command, on a small built-in set, with a stage-1 VAE file where the demo reads it.
    ((_, block),) = bash_blocks(steps)
    (command,) = [shlex.split(line) for line in block.splitlines() if line.startswith("python train.py")]
    torch.manual_seed(0)
    from tests.training.test_diffusion_module import tiny_module

    save_weights(tiny_module().vae, tmp_path / "models" / "demo" / "vae.safetensors",
                 metadata={"latent_scale_factor": 0.7})
    env = dict(os.environ, LDM_ROOT=str(tmp_path), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    result = subprocess.run([sys.executable, *command[1:], *SMALL_DATA], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = tmp_path.glob("outputs/train/demo/*/checkpoints/last.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 5
    assert state["ldm_model_config"]["network"]["_target_"] == "ldm.models.conv_denoiser.ConvDenoiser"

    # Step 4: the documented sampling code, on that checkpoint, in a process of its own.
    (code,) = [textwrap.dedent(block) for block in python_blocks(steps)]
    code = code.replace("outputs/train/demo/<time>/checkpoints/last.ckpt", str(checkpoint))
    probe = code + (
        "\nimport sys, torch\n"
        "from ldm.models.conv_denoiser import ConvDenoiser\n"
        "assert isinstance(pipe.network, ConvDenoiser) and images.shape == (1, 3, 32, 32)\n"
        "assert torch.isfinite(images).all() and 0 <= float(images.min()) and float(images.max()) <= 1\n"
        "again = pipe(['a red circle on a white background'], height=32, width=32, num_inference_steps=10)\n"
        "other = pipe(['a blue square on a black background'], height=32, width=32, num_inference_steps=10)\n"
        "assert torch.equal(images, again) and not torch.equal(images, other)\n"
        "assert 'lightning' not in sys.modules and 'hydra' not in sys.modules\n")
    sampled = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
