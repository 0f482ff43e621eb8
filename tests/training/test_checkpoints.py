"""Safe weight files: atomic safetensors writes with metadata, strict loads that name bad keys."""

import pytest
import torch
from torch import nn

from ldm.checkpoints import (
    CheckpointMismatchError, diffusers_unet_to_ldm, diffusers_vae_to_ldm, ldm_unet_to_diffusers, ldm_vae_to_diffusers,
    load_weights, read_metadata, read_state_dict, save_weights, split_original_checkpoint)


class Payload:
    """A picklable object that a weights-only load must not construct."""


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_safetensors_round_trip_keeps_weights_and_metadata(tmp_path):
    source, target = small_net(), small_net()
    path = save_weights(source, tmp_path / "w" / "net.safetensors", metadata={"latent_scale_factor": "0.5", "cfg": {"a": 1}})
    metadata = load_weights(target, path)
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert metadata["latent_scale_factor"] == "0.5" and metadata["cfg"] == '{"a": 1}'
    assert read_metadata(path) == metadata
    assert [p.name for p in path.parent.iterdir()] == ["net.safetensors"]  # no temporary left behind


def test_mismatch_names_missing_unexpected_and_misshapen_keys(tmp_path):
    state = small_net().state_dict()
    state.pop("2.bias")
    state["extra.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(5, 4)
    path = save_weights(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointMismatchError) as error:
        load_weights(small_net(), path)
    message = str(error.value)
    assert "missing: 2.bias" in message and "unexpected: extra.weight" in message
    assert "0.weight: (5, 4)" in message and "(3, 4) in the model" in message


def test_torch_checkpoints_load_weights_only(tmp_path):
    net = small_net()
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "net.ckpt")
    assert set(read_state_dict(tmp_path / "net.ckpt")) == set(net.state_dict())

    # Any pickled object beyond tensors and plain containers is refused, never constructed.
    torch.save({"state_dict": net.state_dict(), "payload": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only|Unsupported"):
        read_state_dict(tmp_path / "evil.ckpt")


def test_truncated_or_missing_files_give_clear_errors(tmp_path):
    path = save_weights(small_net(), tmp_path / "net.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        read_state_dict(tmp_path / "absent.safetensors")


def test_diffusers_conversion_names_every_key_outside_the_layout():
    weight = torch.zeros(4, 4)
    unet = {"conv_in.weight": weight, "add_embedding.linear_1.weight": weight, "down_blocks.0.bogus.0.weight": weight}
    with pytest.raises(CheckpointMismatchError, match="2 key") as error:
        diffusers_unet_to_ldm(unet, layers_per_block=2)
    assert "add_embedding.linear_1.weight" in str(error.value) and "down_blocks.0.bogus.0.weight" in str(error.value)
    assert "conv_in.weight" not in str(error.value)
    vae = {"encoder.conv_in.weight": weight, "text_model.embeddings.weight": weight}
    with pytest.raises(CheckpointMismatchError, match="text_model.embeddings.weight"):
        diffusers_vae_to_ldm(vae, num_levels=4)
    assert diffusers_vae_to_ldm({"encoder.conv_in.weight": weight}, num_levels=4) == {"encoder.conv_in.weight": weight}


def test_export_conversion_names_every_key_outside_the_original_layout():
    weight = torch.zeros(4, 4)
    with pytest.raises(CheckpointMismatchError, match="label_emb.0.0.weight"):
        ldm_unet_to_diffusers({"input_blocks.0.0.weight": weight, "label_emb.0.0.weight": weight}, layers_per_block=2)
    with pytest.raises(CheckpointMismatchError, match="encoder.down.0.attn.0.q.weight"):
        ldm_vae_to_diffusers({"encoder.down.0.attn.0.q.weight": weight}, num_levels=4)


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
