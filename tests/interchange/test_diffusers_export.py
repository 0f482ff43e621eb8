"""A trained run exported with `python -m ldm.tools.export --format diffusers` is a StableDiffusionPipeline
that generates ldm's images, and the folder reads back into ldm unchanged."""

import json

import pytest
import torch

from ldm.interchange.clip_text import used_text_keys
from ldm.interchange.diffusers_folder import read_diffusers_folder
from ldm.pipeline import TextToImagePipeline
from ldm.interchange.export import export_module
from ldm.tools.export import main as export_main

from .conftest import assert_same_tensors, build_module, tiny_module

diffusers = pytest.importorskip("diffusers")
PROMPTS = ["a red circle on a white background", "a blue square on a gray background"]


def test_stable_diffusion_pipeline_from_an_exported_run_generates_ldm_images(trained_run, tmp_path):
    out = export_main(["--model", str(trained_run), "--format", "diffusers", "--out", str(tmp_path / "exported")])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler) and pipe.safety_checker is None

    ours_pipeline = TextToImagePipeline.from_pretrained(trained_run)
    ours = ours_pipeline(PROMPTS, height=32, width=32, num_inference_steps=12, guidance_scale=2.0, sampler="ddim",
                         seed=[5, 9], steps_offset=1)
    theirs = pipe(PROMPTS, height=32, width=32, num_inference_steps=12, guidance_scale=2.0, output_type="pt",
                  latents=ours_pipeline.initial_noise([5, 9], 32, 32)).images
    assert ours.std() > 0.05  # real images, not a blank that would match anything
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_exported_folder_reads_back_into_ldm_unchanged(tmp_path):
    module = tiny_module("model/text_encoder=tiny", "model.text_encoder.layer=penultimate")
    export_module(module, tmp_path / "sd", format="diffusers", use_ema=True)
    parts = read_diffusers_folder(tmp_path / "sd")
    assert_same_tensors(parts["unet"], module.ema_network.module.state_dict())
    assert_same_tensors(parts["vae"], module.vae.state_dict())
    tower = used_text_keys(module.text_encoder.tower.state_dict())
    last_block = "transformer.resblocks.1."  # penultimate: diffusers' text encoder stops before the last block
    assert_same_tensors(parts["text_encoder"], {k: v for k, v in tower.items() if not k.startswith(last_block)})
    assert parts["latent_scale_factor"] == pytest.approx(0.7)
    config = json.loads((tmp_path / "sd/text_encoder/config.json").read_text())
    assert config["num_hidden_layers"] == 1
    tokenizer = json.loads((tmp_path / "sd/tokenizer/tokenizer_config.json").read_text())
    assert tokenizer["pad_token"] == "!" and tokenizer["model_max_length"] == 16


def test_export_refuses_an_existing_folder_and_unknown_formats(tmp_path):
    module = tiny_module()
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken"):
        export_module(module, tmp_path / "taken", format="diffusers")
    with pytest.raises(ValueError, match="format='onnx'"):
        export_module(module, tmp_path / "x", format="onnx")
    with pytest.raises(SystemExit):  # argparse names the unknown option
        export_main(["--model", "a", "--out", "b", "--fromat", "sd"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no half-written folder left behind


def test_a_diffusers_folder_starts_a_finetune_also_after_diffusers_saves_it_again(tmp_path):
    """Folders written by diffusers/transformers themselves (``save_pretrained``) read the same."""
    module = tiny_module("model.text_encoder.layer=penultimate")
    export_module(module, tmp_path / "ours", format="diffusers", use_ema=False)
    diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "resaved")
    for folder in ("ours", "resaved"):
        loaded = build_module("model.text_encoder.layer=penultimate", "model.latents.scale_factor=null",
                              f"+model.mode.pretrained.path={tmp_path / folder}")
        assert_same_tensors(loaded.network.state_dict(), module.network.state_dict())
        assert_same_tensors(loaded.vae.state_dict(), module.vae.state_dict())
        assert float(loaded.latent_scale_factor) == pytest.approx(0.7)  # from the VAE's scaling_factor
        tower, expected = loaded.text_encoder.tower.state_dict(), module.text_encoder.tower.state_dict()
        for key in ("token_embedding.weight", "transformer.resblocks.0.attn.in_proj_weight", "ln_final.weight"):
            assert torch.equal(tower[key], expected[key]), (folder, key)
