"""Original SD single files: a tiny model exported in that layout loads into ldm and back out unchanged,
with its EMA weights and its text tower in either SD 2.x's (OpenCLIP) or SD 1.x's (transformers) layout."""

import pytest
import torch

from hydra.errors import InstantiationException

from ldm.checkpoints import CheckpointMismatchError, read_state_dict
from ldm.interchange.clip_text import used_text_keys
from ldm.interchange.original_file import split_original_checkpoint
from ldm.interchange.export import export_module

from .conftest import assert_same_tensors, build_module, tiny_module

LAYOUTS = {"penultimate": "cond_stage_model.model.", "last": "cond_stage_model.transformer.text_model."}


@pytest.mark.parametrize("layer", LAYOUTS)
def test_tiny_model_as_an_original_single_file_loads_into_ldm_and_back_out_unchanged(layer, tmp_path):
    source = tiny_module(f"model.text_encoder.layer={layer}")
    path = export_module(source, tmp_path / "model.safetensors", format="sd", use_ema=False)
    state = read_state_dict(path)
    prefixes = {key.split(".")[0] for key in state}
    assert prefixes == {"model", "model_ema", "first_stage_model", "cond_stage_model"}
    assert any(key.startswith(LAYOUTS[layer]) for key in state)

    plain = _loaded(layer, path, use_ema=False)
    assert_same_tensors(plain.network.state_dict(), source.network.state_dict())
    assert_same_tensors(plain.vae.state_dict(), source.vae.state_dict())
    assert_same_tensors(used_text_keys(plain.text_encoder.tower.state_dict()),
                        used_text_keys(source.text_encoder.tower.state_dict()))
    ema = _loaded(layer, path, use_ema=True)
    assert_same_tensors(ema.network.state_dict(), source.ema_network.module.state_dict())
    assert_same_tensors(ema.ema_network.module.state_dict(), source.ema_network.module.state_dict())  # EMA starts there

    ckpt = tmp_path / "model.ckpt"  # the same tensors as a (weights-only) torch checkpoint
    torch.save({"state_dict": state, "global_step": 1}, ckpt)
    assert_same_tensors(_loaded(layer, ckpt, use_ema=True).network.state_dict(), source.ema_network.module.state_dict())

    again = export_module(plain, tmp_path / "again.safetensors", format="sd", use_ema=False)
    without_ema = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    assert_same_tensors({k: v for k, v in read_state_dict(again).items() if not k.startswith("model_ema.")},
                        without_ema)



def _loaded(layer: str, path, use_ema: bool):
    """A fresh tiny module whose U-Net, VAE and text tower come from ``path`` (its own tower seeded apart)."""
    return build_module(f"model.text_encoder.layer={layer}", "model.text_encoder.seed=7",
                        f"+model.mode.pretrained.path={path}", f"+model.mode.pretrained.use_ema={use_ema}")


def test_mismatched_or_incomplete_files_name_the_keys(tmp_path):
    source = tiny_module()
    path = export_module(source, tmp_path / "model.safetensors", format="sd", use_ema=True)
    # Hydra wraps the module's errors in InstantiationException, keeping their message
    with pytest.raises(InstantiationException, match="use_ema: the checkpoint lacks"):
        _loaded("last", path, use_ema=True)  # an EMA-only (pruned) file has no separate EMA weights
    with pytest.raises(InstantiationException, match=r"CheckpointMismatchError.*misshapen: .*input_blocks.0.0.weight"):
        build_module(f"+model.mode.pretrained.path={path}", "model.network.model_channels=16")
    state = read_state_dict(path)
    text_free = tmp_path / "no_text.safetensors"
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}, str(text_free))
    with pytest.raises(InstantiationException, match="no text encoder weights"):
        build_module(f"+model.mode.pretrained.path={text_free}")
    assert build_module(f"+model.mode.pretrained.path={text_free}", "+model.mode.pretrained.text_encoder=false")
    with pytest.raises(InstantiationException, match="model.mode.pretrained.ema is not an argument of PretrainedWeights; "
                                                      "did you mean model.mode.pretrained.use_ema"):
        build_module(f"+model.mode.pretrained.path={path}", "+model.mode.pretrained.ema=true")


def test_original_checkpoint_splits_into_unet_and_vae_and_takes_ema_weights_when_asked():
    unet = {"input_blocks.0.0.weight": torch.randn(8, 4, 3, 3), "out.2.bias": torch.randn(4)}
    vae = {"encoder.conv_in.weight": torch.randn(8, 3, 3, 3)}
    ema = {"model_ema.diffusion_modelinput_blocks00weight": torch.randn(8, 4, 3, 3),
           "model_ema.diffusion_modelout2bias": torch.randn(4)}
    checkpoint = {**{f"model.diffusion_model.{k}": v for k, v in unet.items()},
                  **{f"first_stage_model.{k}": v for k, v in vae.items()},
                  "cond_stage_model.model.positional_embedding": torch.randn(77, 8), **ema}
    parts = split_original_checkpoint(checkpoint)
    assert parts["unet"] == unet and parts["vae"] == vae
    with_ema = split_original_checkpoint(checkpoint, use_ema=True)
    assert torch.equal(with_ema["unet"]["input_blocks.0.0.weight"], ema["model_ema.diffusion_modelinput_blocks00weight"])
    assert torch.equal(with_ema["unet"]["out.2.bias"], ema["model_ema.diffusion_modelout2bias"])

    del checkpoint["model_ema.diffusion_modelout2bias"]
    with pytest.raises(CheckpointMismatchError, match="model_ema.diffusion_modelout2bias"):
        split_original_checkpoint(checkpoint, use_ema=True)
    with pytest.raises(CheckpointMismatchError, match="no keys under 'model.diffusion_model.'"):
        split_original_checkpoint(vae)
