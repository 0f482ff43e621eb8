"""Tiny LatentDiffusion modules and one short training run, shared by the interchange tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.checkpoints import save_weights
from ldm.config import instantiate_module, register_resolvers

ROOT = Path(__file__).resolve().parents[2]


def build_module(*overrides: str):
    """The demo's tiny LatentDiffusion, built from the configs (random VAE, scale factor 0.7)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["model.latents.vae_weights=null", "model.latents.scale_factor=0.7", *overrides])
    return instantiate_module(cfg.model).eval()


def tiny_module(*overrides: str, seed: int = 0):
    """``build_module`` with every weight perturbed and an EMA copy that differs from the raw U-Net, so a
    wrong mapping or a swapped copy cannot go unnoticed."""
    module = build_module(*overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in [*module.network.parameters(), *module.vae.parameters()]:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        module.ema_network.update_parameters(module.network)
        for parameter in module.network.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return module


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """The last.ckpt of a 2-step tiny run through train.py: the demo's models, its frozen VAE a random one
    written to ``<LDM_ROOT>/models/demo/vae.safetensors`` as stage 1 writes it; the run ends by writing its
    model folder (``<run>/model``)."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    vae = build_module().vae
    save_weights(vae, root / "models" / "demo" / "vae.safetensors", metadata={"latent_scale_factor": 0.8})
    env = dict(os.environ, LDM_ROOT=str(root), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    result = subprocess.run([
        sys.executable, "train.py", "experiment=demo", "logger=none", "callbacks=default",
        "+callbacks.export_model._target_=ldm.training.model_export.ExportModelAtEnd",
        "+callbacks.export_model.output_dir=${paths.output_dir}/model",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.max_time=null",
        "data.synthetic.num_train=64", "data.synthetic.num_val=16", "data.synthetic.samples_per_shard=32",
        "data.batch_size=8", "data.val_batch_size=8", "data.num_workers=0",
    ], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = root.glob("outputs/train/demo/*/checkpoints/last.ckpt")
    return checkpoint
