"""DreamBooth: the prior-preservation loss weights, batches that mix in class images reproducibly, and a short
run that draws its class images with the base model once and reuses the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldm.data.dreambooth import MARKER_NAME, DreamBoothDataModule
from ldm.diffusion.prior_preservation import prior_preservation_weights

ROOT = Path(__file__).resolve().parents[2]


def test_prior_preservation_weights_give_instance_mean_plus_weighted_prior_mean():
    losses = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0])
    is_prior = torch.tensor([False, False, True, True, True])
    weights = prior_preservation_weights(is_prior, prior_loss_weight=0.5)
    assert float((weights * losses).sum()) == pytest.approx(2.0 + 0.5 * 20.0)
    only_instances = prior_preservation_weights(torch.zeros(4, dtype=torch.bool), 0.5)
    assert float((only_instances * losses[:4]).sum()) == pytest.approx(float(losses[:4].mean()))


def test_batches_gain_class_images_chosen_by_the_batch_count_alone(tmp_path):
    data = DreamBoothDataModule(class_prompts=["a red circle on a white background"], num_class_images=6,
                                class_dir=str(tmp_path), class_batch_size=3, train_shards="unused", batch_size=2)
    data.class_images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 4, 4).clone()
    data.class_captions = [f"class {i}" for i in range(6)]
    data.trainer = SimpleNamespace(training=True)
    instance = {"image": torch.full((2, 3, 4, 4), -1.0), "caption": ["a red cross", "a blue cross"]}
    data.train_batches_consumed = 7
    batch = data.on_after_batch_transfer(instance, 0)
    assert batch["image"].shape == (5, 3, 4, 4) and batch["is_prior"].tolist() == [False, False, True, True, True]
    chosen = batch["image"][2:, 0, 0, 0].long().tolist()
    assert batch["caption"] == ["a red cross", "a blue cross", *[f"class {i}" for i in chosen]]
    again = data.on_after_batch_transfer(instance, 0)  # a resumed run at the same batch count draws the same
    assert torch.equal(again["image"], batch["image"])
    data.train_batches_consumed = 8
    assert not torch.equal(data.on_after_batch_transfer(instance, 0)["image"], batch["image"])
    data.trainer = SimpleNamespace(training=False)  # validation batches stay as they are
    assert data.on_after_batch_transfer(instance, 0) is instance


@pytest.mark.slow
def test_dreambooth_run_draws_class_images_once_and_reuses_them(tmp_path):
    from hydra import compose, initialize_config_dir

    from ldm.config import instantiate_module, register_resolvers
    from ldm.interchange.export import export_module

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["model.latents.vae_weights=null", "model.latents.scale_factor=0.7"])
    torch.manual_seed(0)
    export_module(instantiate_module(cfg.model), tmp_path / "base", format="diffusers")
    env = dict(os.environ, LDM_ROOT=str(tmp_path), HF_HUB_OFFLINE="1", WANDB_MODE="offline")

    def run(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([
            sys.executable, "train.py", "experiment=demo_dreambooth", f"model.mode.pretrained.path={tmp_path / 'base'}",
            "logger=none", "callbacks=default", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "data.batch_size=4", "data.class_batch_size=4", "data.num_class_images=6", "data.num_workers=0",
            "data.class_num_inference_steps=2", f"hydra.run.dir={tmp_path / name}",
        ], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    first = run("first")
    assert first.returncode == 0, first.stderr[-3000:]
    class_dir = tmp_path / "data" / "dreambooth" / "demo"
    assert sorted(p.name for p in class_dir.iterdir()) == [*(f"{i:05d}.png" for i in range(6)), MARKER_NAME]
    written = (class_dir / MARKER_NAME).stat().st_mtime_ns
    second = run("second")
    assert second.returncode == 0, second.stderr[-3000:]
    assert (class_dir / MARKER_NAME).stat().st_mtime_ns == written  # the cache was reused, not redrawn
    checkpoint = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"] and all(".lora_" in key for key in checkpoint["state_dict"]
                                            if key.startswith("network."))
