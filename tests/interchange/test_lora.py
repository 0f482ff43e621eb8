"""LoRA through peft: adapters only in the optimizer and checkpoints, files that diffusers and kohya-layout tools
read, merges that equal base + scale * up @ down, and bad input named."""

from __future__ import annotations

import pytest
import torch

from ldm.checkpoints import CheckpointMismatchError, read_state_dict, save_weights
from ldm.interchange.diffusers_folder import read_diffusers_folder
from ldm.interchange.lora_files import LoraNames, LoraWeights, read_lora_file, write_lora_file
from ldm.pipeline import TextToImagePipeline
from ldm.interchange.export import export_module
from ldm.tools.export import main as export_main
from ldm.training.lora import LoraError, trainable_fraction, without_adapters
from ldm.training.lora_training import check_lora_checkpoint, module_adapters

from .conftest import build_module, tiny_module

PROMPTS = ["a red cross on a white background", "a blue square on a gray background"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny trained-looking model written as a diffusers folder: the base weights LoRA runs start from."""
    folder = tmp_path_factory.mktemp("base") / "model"
    with torch.random.fork_rng():  # the module's initial weights come from the global generator: fix them
        torch.manual_seed(0)
        export_module(tiny_module(), folder, format="diffusers")
    return folder


def lora_module(base_folder, *overrides: str, seed: int = 1):
    """A LoRA module on ``base_folder`` with adapters made non-zero (a fresh LoRA's up matrices are zero,
    which would hide a wrong mapping or scale)."""
    module = build_module("model/mode=lora", f"+model.mode.pretrained.path={base_folder}", "model.mode.rank=4",
                          "model.mode.alpha=2", *overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if ".lora_" in name and not name.startswith("ema_network"):
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
        module.ema_network.update_parameters(module.network)  # the first update copies: EMA = raw adapters
    return module


def test_only_adapters_train_and_checkpoints_hold_no_base_weights(base_folder):
    module = lora_module(base_folder, "model.mode.text_encoder=true")
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for name, p in module.named_parameters() if name in trainable}
    assert any(name.startswith("text_encoder.") for name in trainable)
    fraction = trainable_fraction([module.network, module.text_encoder])["trainable_fraction"]
    assert 0 < fraction < 0.05

    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved = checkpoint["state_dict"]
    assert {key for key in saved if ".lora_" not in key} == {"latent_scale_factor", "ema_network.n_averaged"}
    assert all(key.startswith(("network.", "ema_network.module.", "text_encoder.tower.")) for key in saved if ".lora_" in key)
    # the EMA copy shares the frozen base tensors instead of holding a second copy
    base_q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.base_layer.weight"
    assert module.ema_network.module.get_parameter(base_q) is module.network.get_parameter(base_q)

    restored = lora_module(base_folder, "model.mode.text_encoder=true", seed=2)
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_merged_model_computes_what_the_peft_model_computes(base_folder):
    """without_adapters (plain layers, W + alpha/r * up @ down) against peft's own forward with adapters."""
    module = lora_module(base_folder, "model.mode.conv=true", "model.mode.text_encoder=true")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 600])
    context = module.text_encoder(PROMPTS)
    plain_text = without_adapters(module.text_encoder)
    torch.testing.assert_close(plain_text(PROMPTS), context, rtol=0, atol=1e-5)
    plain = without_adapters(module.network)
    assert not any(".lora_" in key or "base_layer" in key for key in plain.state_dict())
    torch.testing.assert_close(plain(x, t, context), module.network(x, t, context), rtol=0, atol=1e-5)


def test_kohya_file_written_by_ldm_loads_back_with_every_key_placed(base_folder, tmp_path):
    module = lora_module(base_folder, "model.mode.conv=true", "model.mode.text_encoder=true")
    adapters = module_adapters(module, use_ema=False)
    names = LoraNames(module.network, module.text_encoder)
    path = write_lora_file(tmp_path / "kohya.safetensors", adapters, names, layout="kohya")
    written = read_state_dict(path)
    assert all(key.startswith(("lora_unet_", "lora_te_")) for key in written)
    assert any(key.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.") for key in written)
    assert len(written) == 3 * len(adapters)  # down, up and alpha for every layer: nothing dropped
    loaded = read_lora_file(path, names)
    assert sorted(loaded) == sorted(adapters)
    for name, weights in adapters.items():
        assert torch.equal(loaded[name].down, weights.down) and torch.equal(loaded[name].up, weights.up)
        assert loaded[name].alpha == weights.alpha


def test_kohya_file_from_known_weights_loads_into_ldm(base_folder, tmp_path):
    """A file as sd-scripts writes it (diffusers' module names, lora_down/lora_up/alpha, fp16), for two layers."""
    torch.manual_seed(3)
    down_q, up_q = torch.randn(2, 64), torch.randn(64, 2)
    down_ff, up_ff = torch.randn(2, 64), torch.randn(512, 2)
    state = {
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight": down_q.half(),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.lora_up.weight": up_q.half(),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.alpha": torch.tensor(1.0).half(),
        "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_down.weight": down_ff.half(),
        "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight": up_ff.half(),
        "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha": torch.tensor(8.0).half(),
    }
    save_weights(state, tmp_path / "theirs.safetensors")
    base = TextToImagePipeline.from_pretrained(base_folder)
    tuned = TextToImagePipeline.from_pretrained(base_folder, lora=tmp_path / "theirs.safetensors", lora_scale=0.5)
    layers = {"middle_block.1.transformer_blocks.0.attn2.to_q": (down_q, up_q, 1.0),
              "output_blocks.0.1.transformer_blocks.0.ff.net.0.proj": (down_ff, up_ff, 8.0)}
    for layer, (down, up, alpha) in layers.items():
        expected = base.network.get_submodule(layer).weight + 0.5 * alpha / 2 * up.half().float() @ down.half().float()
        torch.testing.assert_close(tuned.network.get_submodule(layer).weight, expected, rtol=0, atol=1e-5)
    changed = [key for key, value in tuned.network.state_dict().items() if not torch.equal(value, base.network.state_dict()[key])]
    assert sorted(changed) == sorted(f"{layer}.weight" for layer in layers)


def test_diffusers_pipeline_with_load_lora_weights_generates_ldm_lora_images(base_folder, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    module = lora_module(base_folder)
    path = write_lora_file(tmp_path / "pytorch_lora_weights.safetensors", module_adapters(module, use_ema=True),
                           LoraNames(module.network, module.text_encoder), layout="diffusers")
    ours_pipeline = TextToImagePipeline.from_pretrained(base_folder, lora=path)
    ours = ours_pipeline(PROMPTS, height=32, width=32, num_inference_steps=10, guidance_scale=2.0, sampler="ddim",
                         seed=[5, 9], steps_offset=1)
    assert (ours - TextToImagePipeline.from_pretrained(base_folder)(
        PROMPTS, height=32, width=32, num_inference_steps=10, guidance_scale=2.0, seed=[5, 9], steps_offset=1)
            ).abs().max() > 1e-2  # the adapter changes the images, so agreement below is not trivial

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(base_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path))
    theirs = pipe(PROMPTS, height=32, width=32, num_inference_steps=10, guidance_scale=2.0, output_type="pt",
                  latents=ours_pipeline.initial_noise([5, 9], 32, 32)).images
    # Same weights and noise; only float32 rounding differs: diffusers adds the adapter beside the base layer
    # (W x + s B A x) where ldm merges it (W + s B A) x, and the two sum attention and convolutions in other
    # orders. Measured 1.6e-6 (base weights seeded above); 2e-5 leaves a tenfold margin for other CPUs' kernels,
    # while an adapter mapped wrongly or scaled wrongly moves the images by more than 1e-2 (asserted above).
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0)


def test_merge_lora_export_equals_base_plus_scaled_update_for_every_layer(base_folder, tmp_path):
    module = lora_module(base_folder, "model.mode.conv=true")
    adapters = module_adapters(module, use_ema=False)
    path = write_lora_file(tmp_path / "lora.safetensors", adapters, LoraNames(module.network, module.text_encoder),
                           layout="kohya")
    out = export_main(["--model", str(base_folder), "--lora", str(path), "--lora-scale", "0.7", "--merge-lora",
                       "--format", "diffusers", "--out", str(tmp_path / "merged")])
    merged = read_diffusers_folder(out)["unet"]
    base = read_diffusers_folder(base_folder)["unet"]
    adapted = {name.removeprefix("unet.") + ".weight": weights for name, weights in adapters.items()}
    assert any(weights.down.ndim == 4 for weights in adapted.values())  # convolutions too
    for key, value in base.items():
        if key in adapted:
            weights = adapted[key]
            update = 0.7 * weights.alpha / weights.rank * (
                weights.up @ weights.down if weights.down.ndim == 2
                else torch.einsum("or,rikl->oikl", weights.up[:, :, 0, 0], weights.down))
            torch.testing.assert_close(merged[key], value + update, rtol=0, atol=1e-6, msg=key)
        else:
            assert torch.equal(merged[key], value), key
    with pytest.raises(ValueError, match="--merge-lora"):
        export_main(["--model", str(base_folder), "--lora", str(path), "--out", str(tmp_path / "x")])


def test_lora_for_another_architecture_is_refused_naming_the_keys(base_folder, tmp_path):
    wide = LoraWeights(down=torch.zeros(4, 96), up=torch.zeros(96, 4), alpha=4.0)
    state = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": wide.down,
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": wide.up,
             "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
             "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}
    save_weights(state, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointMismatchError, match="lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"):
        TextToImagePipeline.from_pretrained(base_folder, lora=tmp_path / "other.safetensors")
    del state["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"]
    del state["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"]
    save_weights(state, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"input_blocks\.1\.1\.transformer_blocks\.0\.attn1\.to_q"):
        TextToImagePipeline.from_pretrained(base_folder, lora=tmp_path / "wide.safetensors")


def test_rank_mismatch_on_resume_and_unmatched_targets_are_named(base_folder):
    trained = lora_module(base_folder)
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    other_rank = build_module("model/mode=lora", f"+model.mode.pretrained.path={base_folder}", "model.mode.rank=8")
    with pytest.raises(LoraError, match=r"model.mode.rank=8 .* rank 4.*set model.mode.rank=4"):
        check_lora_checkpoint(checkpoint, other_rank.state_dict(), other_rank.mode.lora)
    # (Hydra wraps the constructor's LoraError in its InstantiationException, keeping the message)
    with pytest.raises(Exception, match="to_qkv, attn9.to_q match no linear or convolution layer"):
        build_module("model/mode=lora", f"+model.mode.pretrained.path={base_folder}",
                     "model.mode.target_modules=[to_q,to_qkv,attn9.to_q]")
    with pytest.raises(Exception, match="LoraError.*model.mode.pretrained.path"):
        build_module("model/mode=lora", "model.mode.rank=4")
