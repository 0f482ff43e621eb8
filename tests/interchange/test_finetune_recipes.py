"""experiment=sd15_finetune / sd21_base_finetune: the published architectures and recipe values, and a
tiny fine-tune through train.py that starts from an original-layout checkpoint."""

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ldm.checkpoints import read_state_dict
from ldm.config import register_resolvers
from ldm.interchange.clip_text import used_text_keys
from ldm.pipeline import TextToImagePipeline
from ldm.interchange.export import export_module

from .conftest import ROOT, assert_same_tensors, tiny_module

RECIPES = {
    "sd15_finetune": dict(context_dim=768, num_heads=8, use_linear_in_transformer=False,
                          text=("ViT-L-14-quickgelu", "last", 49407)),
    "sd21_base_finetune": dict(context_dim=1024, num_head_channels=64, use_linear_in_transformer=True,
                               text=("ViT-H-14", "penultimate", 0)),
    "sd21_finetune": dict(context_dim=1024, num_head_channels=64, use_linear_in_transformer=True,
                          text=("ViT-H-14", "penultimate", 0), prediction_type="v_prediction", resolution=768,
                          upcast_attention=True, batch_size=2),
}


def compose_recipe(name: str, *overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides])


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_the_published_model_and_a_cluster_setup(name):
    cfg = compose_recipe(name, "model.mode.pretrained.path=/ckpt/model.safetensors", "data.train_shards='/d/{0..9}.tar'")
    expected = RECIPES[name]
    unet = cfg.model.network
    for key in ("context_dim", "num_heads", "num_head_channels", "use_linear_in_transformer", "upcast_attention"):
        if key in expected:
            assert unet[key] == expected[key], key
    assert (unet.model_channels, list(unet.channel_mult), unet.use_checkpoint, unet.channels_last) == (
        320, [1, 2, 4, 4], True, True)
    text = cfg.model.text_encoder
    assert (text.model_name, text.layer, text.get("pad_token_id", 0), text.pretrained) == (*expected["text"], None)
    assert cfg.model.vae.ch == 128 and cfg.model.latents.scale_factor == pytest.approx(0.18215)
    assert cfg.model.noise_schedule.schedule == "scaled_linear"
    assert cfg.model.objective.prediction_type == expected.get("prediction_type", "epsilon")
    assert (cfg.trainer.accelerator, cfg.trainer.strategy, cfg.trainer.precision) == ("gpu", "ddp", "bf16-mixed")
    assert cfg.model.optimizer.lr == pytest.approx(1e-5) and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.data.resolution == cfg.model.vae.resolution == expected.get("resolution", 512)
    assert cfg.data.batch_size == expected.get("batch_size", 4)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_demands_a_checkpoint_and_shards(name):
    cfg = compose_recipe(name)
    missing = [key for key in ("model.mode.pretrained.path", "data.train_shards") if OmegaConf.is_missing(
        OmegaConf.select(cfg, key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1])]
    assert missing == ["model.mode.pretrained.path", "data.train_shards"]


def test_tiny_finetune_starts_from_the_checkpoint_and_keeps_frozen_parts_out_of_its_checkpoints(tmp_path):
    source = tiny_module("model.text_encoder.layer=penultimate")
    weights = export_module(source, tmp_path / "base.safetensors", format="sd", use_ema=True)
    env = dict(os.environ, LDM_ROOT=str(tmp_path), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    result = subprocess.run([
        sys.executable, "train.py", "experiment=sd21_base_finetune", f"model.mode.pretrained.path={weights}",
        "model/network=tiny", "model/vae=tiny", "model/text_encoder=tiny", "model.text_encoder.layer=penultimate",
        "model.network.channels_last=true", "model.network.use_checkpoint=true", "model.latents.scale_factor=0.7",
        "data=synthetic", "data.resolution=32", "data.batch_size=8", "data.num_workers=0",
        "data.synthetic.num_train=64", "data.synthetic.num_val=16", "data.synthetic.samples_per_shard=32",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "callbacks=default", "logger=csv",
    ], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = tmp_path.glob("outputs/train/sd21_base_finetune/*/checkpoints/last.ckpt")
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(key.startswith(("vae.", "text_encoder.")) for key in stored)  # they come from base.safetensors
    module = TextToImagePipeline.from_pretrained(checkpoint, use_ema=False)  # the raw U-Net, as trained
    assert_same_tensors(module.vae.state_dict(), source.vae.state_dict())
    assert_same_tensors(used_text_keys(module.text_encoder.tower.state_dict()),
                        used_text_keys(source.text_encoder.tower.state_dict()))
    start = source.ema_network.module.state_dict()
    change = max(float((module.network.state_dict()[k] - v).abs().max()) for k, v in start.items())
    # two AdamW steps at lr 1e-5 move each weight by ~2e-5: trained, and from the checkpoint's weights
    assert 0 < change < 1e-4
    assert read_state_dict(weights)  # the base file is untouched and still readable


def test_sdxl_recipe_composes_sdxl_parts_that_fit_together_and_a_cluster_setup():
    from hydra.utils import instantiate

    from ldm.training.module_checks import check_model_compatibility

    cfg = compose_recipe("sdxl_finetune", "model.mode.pretrained.path=/ckpt/sd_xl_base_1.0.safetensors",
                         "data.train_shards='/d/{0..9}.tar'")
    model = cfg.model
    assert (model.network.context_dim, model.network.adm_in_channels, list(model.network.transformer_depth)) == (
        2048, 2816, [1, 2, 10])
    assert [tower.pretrained for tower in model.text_encoder.text_encoders] == [None, None]
    assert model.latents.scale_factor == pytest.approx(0.13025) and model.vae.resolution == cfg.data.resolution == 1024
    assert dict(cfg.data.buckets) == {"pixel_budget": 1024 * 1024, "side_step": 64, "max_aspect_ratio": 4.0}
    assert (cfg.trainer.strategy, cfg.trainer.precision, cfg.trainer.accumulate_grad_batches) == ("ddp", "bf16-mixed", 4)
    assert model.optimizer.lr == pytest.approx(1e-6) and cfg.data.caption_dropout_prob == pytest.approx(0.2)
    with torch.device("meta"):  # the composed parts fit: context 2048, vector 2816
        check_model_compatibility(instantiate(model.network), instantiate(model.vae), instantiate(model.text_encoder))
