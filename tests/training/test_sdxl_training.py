"""SDXL-class training: the module builds the U-Net's vector from the pooled text embedding and the batch's
size fields, drops size conditions for guidance, and stops at start-up on mismatched parts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ldm.config import instantiate_module

ROOT = Path(__file__).resolve().parents[2]
XL = ("model/network=tiny_xl", "model/text_encoder=tiny_xl")


def xl_module(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "model.latents.vae_weights=null", "model.latents.scale_factor=0.5",
                                          *XL, *overrides])
    torch.manual_seed(0)
    module = instantiate_module(cfg.model)
    with torch.no_grad():  # a U-Net whose output depends on its inputs (zero-initialised layers would hide it)
        for parameter in module.network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return module


def batch(crop=(0, 0), size=4):
    return {"image": torch.rand(size, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1,
            "caption": ["a red circle on a white background", "", "a blue square on a black background", "x"][:size],
            "original_size": torch.tensor([[64, 48]] * size), "crop_coords": torch.tensor([list(crop)] * size),
            "target_size": torch.tensor([[32, 32]] * size)}


def loss_at(module, data) -> float:
    latents = module.scale_latents(module.vae.encode(data["image"]).mode())
    cond = module.batch_conditioning(data)
    with torch.no_grad():
        return float(module.diffusion_loss(latents, cond, generator=torch.Generator().manual_seed(3)))


def test_the_size_fields_reach_the_unet_and_dropping_a_condition_removes_them():
    module = xl_module().eval()
    assert loss_at(module, batch((0, 0))) != pytest.approx(loss_at(module, batch((16, 8))), rel=1e-6)
    cond = module.batch_conditioning(batch((16, 8)))
    context, vector = cond.tokens, cond.vector
    assert context.shape == (4, 16, 96) and vector.shape == (4, 128)
    assert vector[1, :32].abs().max() == 0  # the dropped ("") caption's pooled embedding is zero

    always_dropped = xl_module("model.text_encoder.size_condition_dropout={crop_coords: 1.0}").train()
    first = always_dropped.batch_conditioning(batch((0, 0))).vector
    second = always_dropped.batch_conditioning(batch((16, 8))).vector
    torch.testing.assert_close(first, second)  # the crop embedding is zeroed in training
    assert first[:, 64:96].abs().max() == 0 and first[:, 32:64].abs().max() > 0
    always_dropped.train(False)
    assert not torch.equal(always_dropped.batch_conditioning(batch((16, 8))).vector, second)  # kept when not training


def test_a_training_step_runs_and_a_batch_without_size_fields_names_them():
    module = xl_module().train()
    assert torch.isfinite(module.training_step(batch(), 0))
    without = {key: value for key, value in batch().items() if key != "target_size"}
    with pytest.raises(KeyError, match=r"lack \['target_size'\].*data.buckets"):
        module.training_step(without, 0)


def test_misconfigured_sdxl_parts_stop_at_start_up_naming_the_key():
    # (Hydra wraps the module's ValueError; train.py prints its one line)
    with pytest.raises(Exception, match=r"model.network.adm_in_channels=64 .* 128-dim \(32 pooled \+ 3 x 2 x 16"):
        xl_module("model.network.adm_in_channels=64")
    with pytest.raises(Exception, match=r"model.network.context_dim=64 but the text towers output 32 \+ 64 = 96"):
        xl_module("model.network.context_dim=64")
    with pytest.raises(Exception, match="model.network.adm_in_channels=128 .* gives no vector"):
        xl_module("model/text_encoder=tiny", "model.network.context_dim=64")  # one tower: no vector for the U-Net
    with pytest.raises(Exception, match="model.text_encoder.size_condition_dropout.aspect"):
        xl_module("model.text_encoder.size_condition_dropout={aspect: 0.1}")
    module = xl_module()
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(resolution=32))  # a data module without buckets
    with pytest.raises(ValueError, match=r"size_conditions=\['original_size', 'crop_coords', 'target_size'\].*"
                                         r"data.buckets"):
        module.setup("fit")
    # each bucket side is checked against the VAE x U-Net factor at start-up, naming the bucket
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(resolution=32, buckets=[[32, 32], [32, 36]]))
    with pytest.raises(ValueError, match=r"data.buckets\[1\]=\[32, 36\]: 36 px"):
        module.setup("fit")
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(resolution=32, buckets=[[32, 32], [32, 64]]))
    module.setup("fit")


def test_demo_xl_composes_an_sdxl_style_model_on_the_multi_aspect_set_with_crops():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo_xl"])
    assert cfg.model.network.adm_in_channels == 128 and cfg.model.text_encoder.pooled_encoder == 1
    buckets = [list(bucket) for bucket in cfg.data.buckets]
    assert buckets == [[32, 32], [32, 64], [64, 32]]
    # 32x96 and 96x32 scenes go to the 32x64 / 64x32 buckets and are cropped there: crop offsets to learn from
    assert [32, 96] in [list(size) for size in cfg.data.synthetic.sizes] and cfg.data.bucket_crop == "random"
