"""Safe weight files: atomic safetensors writes with metadata, strict loads that name bad keys."""

import pytest
import torch
from torch import nn

from ldm.checkpoints import CheckpointMismatchError, load_weights, read_metadata, read_state_dict, save_weights


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
    with pytest.raises(Exception, match="not a weights-only torch checkpoint"):
        read_state_dict(tmp_path / "evil.ckpt")


def test_truncated_or_missing_files_give_clear_errors(tmp_path):
    path = save_weights(small_net(), tmp_path / "net.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        read_state_dict(tmp_path / "absent.safetensors")
