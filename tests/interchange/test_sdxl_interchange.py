"""SDXL-class models travel both ways: the original SDXL single file (model.diffusion_model.*,
first_stage_model.*, conditioner.embedders.0.transformer.* for CLIP-L in transformers' layout,
conditioner.embedders.1.model.* for OpenCLIP bigG) round-trips bit-exactly, a released-style file without
ldm's metadata loads from its shapes, and an exported diffusers SDXL folder generates ldm's images in
diffusers' StableDiffusionXLPipeline."""

import json

import pytest
import torch

from ldm.checkpoints import read_state_dict, save_weights
from ldm.interchange.load_model import load_model
from ldm.pipeline import TextToImagePipeline
from ldm.interchange.export import export_module, export_pipeline

from .conftest import assert_same_tensors, tiny_module

SDXL_OVERRIDES = ("model/network=tiny_xl", "model/text_encoder=tiny_xl")
PROMPTS = ["a red circle on a white background", "a blue square on a gray background"]


@pytest.fixture(scope="module")
def module():
    return tiny_module(*SDXL_OVERRIDES)


def generate(pipeline: TextToImagePipeline, **options):
    return pipeline(PROMPTS, height=32, width=48, num_inference_steps=6, guidance_scale=2.0, sampler="ddim",
                    seed=[5, 9], **options)


def test_original_sdxl_file_has_sdxls_layout_and_round_trips_bit_exactly(module, tmp_path):
    first = export_module(module, tmp_path / "xl.safetensors", format="sd", use_ema=False)
    state = read_state_dict(first)
    assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (128, 128)
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in state
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in state
    projection = state["conditioner.embedders.1.model.text_projection"]
    assert torch.equal(projection, module.text_encoder.text_encoders[1].tower.text_projection)
    assert "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight" in state
    assert any(key.startswith("first_stage_model.") for key in state) and any(k.startswith("model_ema.") for k in state)

    loaded = load_model(first, use_ema=False)
    second = export_pipeline(TextToImagePipeline(
        loaded.network, loaded.vae, loaded.text_encoder, loaded.noise_schedule.alphas_cumprod, loaded.latent_scale_factor,
        model_config=loaded.model_config, ema_state=loaded.ema_state), tmp_path / "again.safetensors", format="sd")
    assert_same_tensors(read_state_dict(second), state)


def test_a_released_style_sdxl_file_loads_from_its_shapes_and_generates_ldms_images(module, tmp_path):
    exported = export_module(module, tmp_path / "xl.safetensors", format="sd")
    bare = tmp_path / "released.safetensors"
    save_weights(read_state_dict(exported), bare)  # no ldm metadata: the architecture is read from the shapes
    loaded = load_model(bare)
    config = loaded.model_config
    assert config["network"]["transformer_depth"] == [1, 1, 2] and config["network"]["adm_in_channels"] == 128
    assert config["text_encoder"]["size_embedding_dim"] == 16 and loaded.latent_scale_factor == pytest.approx(0.13025)
    assert [tower["layer"] for tower in config["text_encoder"]["text_encoders"]] == ["penultimate"] * 2
    # head counts and norm groups are what shapes do not tell (SD: 64-channel heads, 32 groups): the tiny
    # model's are given, with its VAE and schedule (the U-Net's depths and vector come from the shapes)
    pipeline = TextToImagePipeline.from_pretrained(bare, model_config={
        "network": {"num_head_channels": 16, "norm_num_groups": 8},
        **{name: module.model_config[name] for name in ("vae", "text_encoder", "noise_schedule")}})
    pipeline.latent_scale_factor = float(module.latent_scale_factor)
    ours = generate(module.pipeline())
    assert ours.std() > 0.05
    torch.testing.assert_close(generate(pipeline), ours, atol=1e-5, rtol=0)


def test_stable_diffusion_xl_pipeline_from_an_exported_model_generates_ldm_images(module, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    out = export_module(module, tmp_path / "exported", format="diffusers")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    unet_config = json.loads((out / "unet/config.json").read_text())
    assert unet_config["addition_embed_type"] == "text_time" and unet_config["transformer_layers_per_block"] == [1, 1, 2]
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(out, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    ours_pipeline = module.pipeline()
    ours = generate(ours_pipeline, steps_offset=1)
    theirs = pipe(PROMPTS, height=32, width=48, num_inference_steps=6, guidance_scale=2.0, output_type="pt",
                  latents=ours_pipeline.initial_noise([5, 9], 32, 48)).images
    assert ours.std() > 0.05
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    # micro-conditioning reaches diffusers too: a crop offset changes both sides' images alike
    cropped = generate(ours_pipeline, steps_offset=1, crop_coords=(16, 24))
    theirs_cropped = pipe(PROMPTS, height=32, width=48, num_inference_steps=6, guidance_scale=2.0, output_type="pt",
                          crops_coords_top_left=(16, 24), latents=ours_pipeline.initial_noise([5, 9], 32, 48)).images
    assert (cropped - ours).abs().max() > 1e-3
    torch.testing.assert_close(theirs_cropped, cropped, atol=1e-4, rtol=0)
    # and ldm reads the folder back into the same model
    again = TextToImagePipeline.from_pretrained(out)
    torch.testing.assert_close(generate(again, steps_offset=1), ours, atol=1e-5, rtol=0)


def test_the_sample_tool_and_eval_options_set_the_micro_conditioning(module, tmp_path):
    import numpy
    from PIL import Image

    from ldm.config_check import build_options
    from ldm.evaluation.options import EvalOptions
    from ldm.tools.sample import main as sample_main

    folder = export_module(module, tmp_path / "model", format="diffusers")
    pipeline = TextToImagePipeline.from_pretrained(folder)
    settings = dict(height=32, width=48, num_inference_steps=6, guidance_scale=2.0, sampler="ddim", seed=5)
    default = pipeline([PROMPTS[0]], **settings)
    conditions = {"crop-coords": (16, 24), "original-size": (64, 96), "target-size": (40, 56)}
    for option, value in conditions.items():
        (path,) = sample_main(["--model", str(folder), "--prompt", PROMPTS[0], "--steps", "6", "--guidance-scale", "2",
                               "--sampler", "ddim", "--seed", "5", "--height", "32", "--width", "48",
                               f"--{option}", *map(str, value), "--out-dir", str(tmp_path / option)])
        expected = pipeline([PROMPTS[0]], **settings, **{option.replace("-", "_"): value})
        assert (expected - default).abs().max() > 1e-3, option  # each condition reaches the U-Net's vector
        written = torch.from_numpy(numpy.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        assert (written - expected[0]).abs().max() <= 1 / 255 + 1e-6, option  # PNG rounding
    options = build_options(EvalOptions, {"micro_conditioning": {"crop_coords": [16, 24]}}, "eval")
    assert options.micro_conditioning == {"crop_coords": [16, 24]}
    with pytest.raises(ValueError, match="eval.micro_conditioning.aspect"):
        EvalOptions(micro_conditioning={"aspect": [1, 2]})


def test_an_sdxl_file_starts_a_finetune_with_its_unet_vae_and_both_towers(tmp_path):
    from .conftest import build_module

    module = tiny_module(*SDXL_OVERRIDES, seed=4)
    with torch.no_grad():  # towers unlike the seeded ones a new run builds
        for parameter in module.text_encoder.parameters():
            parameter.add_(0.01)
    exported = export_module(module, tmp_path / "xl.safetensors", format="sd", use_ema=False)
    finetune = build_module(*SDXL_OVERRIDES, f"+model.mode.pretrained.path={exported}", "model.latents.scale_factor=0.13025")
    assert_same_tensors(finetune.network.state_dict(), module.network.state_dict())
    assert_same_tensors(finetune.vae.state_dict(), module.vae.state_dict())
    towers = list(zip(finetune.text_encoder.text_encoders, module.text_encoder.text_encoders))
    # the pooled tower's projection travels; CLIP-L's is unused and SDXL files do not hold it
    assert torch.equal(towers[1][0].tower.text_projection, towers[1][1].tower.text_projection)
    for ours, theirs in towers:
        assert torch.equal(ours.tower.transformer.resblocks[0].attn.in_proj_weight,
                           theirs.tower.transformer.resblocks[0].attn.in_proj_weight)
    # frozen towers that come from the file are left out of the run's checkpoints
    assert "text_encoder." in finetune._prefixes_left_out()


@pytest.mark.slow
def test_a_demo_xl_run_exports_a_folder_that_stable_diffusion_xl_pipeline_samples_as_ldm(tmp_path):
    """A 3-step experiment=demo_xl run through train.py (bucketed multi-aspect data, micro-conditioning) ends by
    writing its model folder; diffusers' SDXL pipeline generates ldm's images from it at each aspect ratio."""
    import os
    import subprocess
    import sys

    from .conftest import ROOT, build_module

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    save_weights(build_module().vae, tmp_path / "models" / "demo" / "vae.safetensors",
                 metadata={"latent_scale_factor": 0.8})
    env = dict(os.environ, LDM_ROOT=str(tmp_path), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    result = subprocess.run([
        sys.executable, "train.py", "experiment=demo_xl", "logger=none", "trainer.max_steps=3", "trainer.max_time=null",
        "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "data.synthetic.num_train=135",
        "data.synthetic.num_val=27", "data.synthetic.samples_per_shard=135", "data.batch_size=8",
        "data.val_batch_size=8", "data.num_workers=0", "callbacks.sample_grid.num_inference_steps=2",
    ], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = tmp_path.glob("outputs/train/demo_xl/*/model")
    ours = TextToImagePipeline.from_pretrained(folder)
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    for height, width in ((32, 32), (32, 64), (64, 32)):
        expected = ours(PROMPTS, height=height, width=width, num_inference_steps=6, guidance_scale=2.0,
                        sampler="ddim", seed=[3, 4], steps_offset=1)
        images = theirs(PROMPTS, height=height, width=width, num_inference_steps=6, guidance_scale=2.0,
                        output_type="pt", latents=ours.initial_noise([3, 4], height, width)).images
        assert expected.std() > 0.05
        torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
