"""TextToImagePipeline.from_pretrained: a training checkpoint, the run's model folder and an SD file give the
images the training module gives, with neither Lightning nor Hydra imported; released SD files are read from
their shapes; bad files and bad numbers stop in one line."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch

from ldm.checkpoints import NotACheckpointError, read_state_dict, save_weights
from ldm.config import register_resolvers
from ldm.interchange.original_configs import unet_config_from_weights, vae_config_from_weights
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.unet import UNetModel
from ldm.pipeline import TextToImagePipeline
from ldm.interchange.export import export_pipeline

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle on a white background", "a blue square on a gray background"]
SETTINGS = dict(height=32, width=32, num_inference_steps=4, guidance_scale=2.0, sampler="ddim", seed=[3, 4])


def training_module_pipeline(checkpoint: Path) -> TextToImagePipeline:
    """The generation path before from_pretrained: the LightningModule rebuilt by Hydra from the checkpoint."""
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    register_resolvers()
    module = hydra.utils.instantiate(stored["ldm_model_config"])
    module.model_config = stored["ldm_model_config"]
    module.on_load_checkpoint(stored)
    module.load_state_dict(stored["state_dict"])
    return module.eval().pipeline(use_ema=True)


def test_checkpoint_model_folder_and_sd_file_generate_what_the_training_module_generates(trained_run, tmp_path):
    expected = training_module_pipeline(trained_run)(PROMPTS, **SETTINGS)
    assert expected.std() > 0.05
    model_folder = trained_run.parents[1] / "model"  # written by the run at its end
    from_checkpoint = TextToImagePipeline.from_pretrained(trained_run)
    sd_file = export_pipeline(from_checkpoint, tmp_path / "model.safetensors", format="sd")
    for source in (trained_run, model_folder, sd_file):
        images = TextToImagePipeline.from_pretrained(source)(PROMPTS, **SETTINGS)
        # the folder's weights pass through diffusers' layout: the same tensors, so the same images
        torch.testing.assert_close(images, expected, atol=1e-6, rtol=0, msg=str(source))
    assert from_checkpoint.resolution == 32 and from_checkpoint.model_config["network"]["context_dim"] == 64


def test_from_pretrained_imports_neither_lightning_nor_hydra(trained_run):
    script = (
        "import sys, torch\n"
        "from ldm.pipeline import TextToImagePipeline\n"
        "for source in sys.argv[1:]:\n"
        "    TextToImagePipeline.from_pretrained(source)(['a red circle'], height=32, width=32, num_inference_steps=2)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('lightning', 'hydra', "
        "'pytorch_lightning', 'omegaconf')}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script, str(trained_run), str(trained_run.parents[1] / "model")],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_a_released_sd_files_architecture_is_read_from_its_shapes(preset):
    """The published U-Net and VAE presets, built on the meta device, are recovered from their tensors alone."""
    import yaml

    unet_config = yaml.safe_load((ROOT / f"configs/model/network/{preset}.yaml").read_text())
    vae_config = yaml.safe_load((ROOT / "configs/model/vae/sd.yaml").read_text())
    with torch.device("meta"):
        unet_state = UNetModel(**{k: v for k, v in unet_config.items() if k != "_target_"}).state_dict()
        vae_state = AutoencoderKL(**{k: v for k, v in vae_config.items() if k != "_target_"}).state_dict()
    inferred = unet_config_from_weights(unet_state)
    inferred["attention_resolutions"] = sorted(inferred["attention_resolutions"], reverse=True)  # order is free
    for key, value in inferred.items():
        assert unet_config.get(key, value) == value, key
    inferred_vae = vae_config_from_weights(vae_state)
    for key, value in inferred_vae.items():
        assert vae_config.get(key, value) == value, key


def test_a_released_sd_file_without_ldm_metadata_loads(trained_run, tmp_path):
    """A file as other tools write it (tensors only): the tiny model's head count and group norms, and its text
    tower's activation and padding token (a file in SD 1.x's text layout is read as SD 1.x's QuickGELU tower
    padded with the end token), which shapes do not tell, come from model_config; everything else from the
    shapes. The same architecture with the same weights then computes the same images."""
    pipeline = TextToImagePipeline.from_pretrained(trained_run)
    path = export_pipeline(pipeline, tmp_path / "with_metadata.safetensors", format="sd")
    bare = save_weights(read_state_dict(path), tmp_path / "bare.safetensors")
    config = pipeline.model_config
    overrides = {"network": {key: config["network"][key] for key in ("num_heads", "num_head_channels", "norm_num_groups")},
                 "vae": {"norm_num_groups": config["vae"]["norm_num_groups"], "resolution": 32},
                 "text_encoder": {key: config["text_encoder"][key]
                                  for key in ("text_cfg", "quick_gelu", "pad_token_id")},
                 "noise_schedule": config["noise_schedule"]}
    loaded = TextToImagePipeline.from_pretrained(bare, model_config=overrides)
    loaded.latent_scale_factor = pipeline.latent_scale_factor  # a bare file does not record it (SD's 0.18215)
    assert loaded.model_config["text_encoder"] == config["text_encoder"]
    torch.testing.assert_close(loaded(PROMPTS, **SETTINGS), pipeline(PROMPTS, **SETTINGS), atol=0, rtol=0)


class NotTensors:
    pass


def test_files_that_are_not_weights_only_checkpoints_are_refused_in_one_line(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(256))
    pickled = tmp_path / "pickled.ckpt"
    with pickled.open("wb") as handle:
        pickle.dump({"state_dict": NotTensors()}, handle)
    code = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "obj": NotTensors()}, code)
    for path in (junk, pickled, code):
        with pytest.raises(NotACheckpointError) as raised:
            TextToImagePipeline.from_pretrained(path)
        message = str(raised.value)
        assert "\n" not in message and str(path) in message and "weights_only=False" not in message
    completed = subprocess.run([sys.executable, "-m", "ldm.tools.sample", "--model", str(code), "--prompt", "x"],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 2 and len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert "weights_only=False" not in completed.stderr


@pytest.mark.parametrize("args,message", [
    (["--guidance-scale", "nan"], "--guidance-scale: nan is not a finite number"),
    (["--steps", "0"], "--steps: 0 must be at least 1"),
])
def test_sample_refuses_bad_numbers_before_loading_anything(args, message, capsys):
    from ldm.tools.sample import main as sample_main

    with pytest.raises(SystemExit) as raised:
        sample_main(["--model", "/nonexistent", "--prompt", "x", *args])
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_pipeline_refuses_a_non_finite_guidance_scale(trained_run):
    pipeline = TextToImagePipeline.from_pretrained(trained_run)
    with pytest.raises(ValueError, match="guidance_scale=nan must be a finite number"):
        pipeline(["x"], height=32, width=32, guidance_scale=float("nan"))


@pytest.mark.parametrize("tool", ["sample", "export", "make_shards", "precompute_latents"])
def test_every_tool_answers_help(tool, capsys):
    import importlib

    with pytest.raises(SystemExit) as raised:
        importlib.import_module(f"ldm.tools.{tool}").main(["--help"])
    assert raised.value.code == 0 and "usage:" in capsys.readouterr().out


def test_model_folder_is_a_stable_diffusion_pipeline(trained_run):
    diffusers = pytest.importorskip("diffusers")
    folder = trained_run.parents[1] / "model"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    ours = TextToImagePipeline.from_pretrained(folder)
    theirs = pipe(PROMPTS, height=32, width=32, num_inference_steps=4, guidance_scale=2.0, output_type="pt",
                  latents=ours.initial_noise([3, 4], 32, 32)).images
    torch.testing.assert_close(theirs, ours(PROMPTS, **SETTINGS, steps_offset=1), atol=1e-4, rtol=0)
