"""OpenCLIP text towers and transformers' CLIPTextModel: the same network under two key layouts."""

import open_clip
import pytest
import torch

from ldm.checkpoints import CheckpointMismatchError
from ldm.interchange.clip_text import hf_text_to_open_clip, open_clip_text_to_hf, used_text_keys
from ldm.interchange.diffusers_configs import clip_text_config
from ldm.models.text_encoders import FrozenOpenCLIPTextEncoder

transformers = pytest.importorskip("transformers")
TEXT_CFG = dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=3, output_dim=64)
CAPTIONS = ["a red circle on a white background", "two cats!", ""]


def perturbed_encoder(layer: str, quick_gelu: bool = False) -> FrozenOpenCLIPTextEncoder:
    cfg = dict(TEXT_CFG, act_layer=open_clip.transformer.QuickGELU) if quick_gelu else TEXT_CFG
    encoder = FrozenOpenCLIPTextEncoder(text_cfg=cfg, layer=layer, seed=1)
    with torch.no_grad():  # LayerNorms start at 1/0: perturb them too so a swapped norm shows
        for parameter in encoder.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
    return encoder


@pytest.mark.parametrize("layer,quick_gelu", [("last", False), ("penultimate", False), ("last", True)])
def test_clip_text_model_from_converted_weights_gives_the_same_context(layer, quick_gelu):
    encoder = perturbed_encoder(layer, quick_gelu)
    num_layers = TEXT_CFG["layers"] - (layer == "penultimate")
    config = clip_text_config(encoder.tower, num_layers)
    assert config["hidden_act"] == ("quick_gelu" if quick_gelu else "gelu")
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    state = open_clip_text_to_hf(encoder.tower.state_dict(), num_layers=num_layers)
    if not any(key.startswith("text_model.") for key in reference.state_dict()):  # transformers 5 drops the prefix
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in key for key in missing)
    tokens = encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        expected = reference(input_ids=tokens).last_hidden_state
    torch.testing.assert_close(encoder(CAPTIONS), expected, atol=1e-5, rtol=1e-5)


def test_conversion_round_trips_and_names_foreign_keys():
    tower_state = perturbed_encoder("last").tower.state_dict()
    back = hf_text_to_open_clip(open_clip_text_to_hf(tower_state))
    assert sorted(back) == sorted(used_text_keys(tower_state))
    for key, tensor in back.items():
        assert torch.equal(tensor, tower_state[key]), key
    with pytest.raises(CheckpointMismatchError, match="transformer.something_else"):
        open_clip_text_to_hf({**tower_state, "transformer.something_else": torch.zeros(1)})
    hf = open_clip_text_to_hf(tower_state)
    del hf["text_model.encoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"layers.1.self_attn \(has only \['q', 'v'\]"):
        hf_text_to_open_clip(hf)


def test_sd1_padding_uses_the_end_token_after_the_caption_only():
    encoder = FrozenOpenCLIPTextEncoder(text_cfg=TEXT_CFG, pad_token_id=49407)
    zeros = FrozenOpenCLIPTextEncoder(text_cfg=TEXT_CFG)
    padded, plain = encoder.tokenize(["hi! there"]), zeros.tokenize(["hi! there"])
    end = int((plain[0] == 49407).nonzero()[0])
    assert end == 4 and torch.equal(padded[0, : end + 1], plain[0, : end + 1])
    assert (padded[0, end + 1 :] == 49407).all() and (plain[0, end + 1 :] == 0).all()


def test_named_model_loads_a_local_weights_file(tmp_path):
    """A model by open_clip name, its weights from a local file (the cluster path, with no hub)."""
    from safetensors.torch import save_file

    name = "ldm-test-tiny-clip"
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / f"{name}.json").write_text(__import__("json").dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    source = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():
        source.token_embedding.weight.mul_(3.0)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    encoder = FrozenOpenCLIPTextEncoder(model_name=name, pretrained=str(tmp_path / "weights.safetensors"))
    assert torch.equal(encoder.tower.token_embedding.weight, source.token_embedding.weight)
    assert encoder(["a cat"]).shape == (1, 77, 32)


@pytest.mark.parametrize("name,layers,parameters", [
    ("ViT-L-14-quickgelu", 12, 123_060_480),  # SD 1.x's text_encoder
    ("ViT-H-14", 23, 340_387_840),  # SD 2.x's: OpenCLIP ViT-H/14 without its last block (penultimate layer)
])
def test_full_size_towers_convert_to_the_published_sd_text_encoders(name, layers, parameters):
    """At full size, on the meta device: the converted keys and shapes are those of SD's CLIPTextModel."""
    tower = open_clip.create_model(name, pretrained=None, device="meta")
    del tower.visual
    config = clip_text_config(tower, layers)
    with torch.device("meta"):
        reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    ours = {k.removeprefix("text_model."): v.shape for k, v in open_clip_text_to_hf(tower.state_dict(), layers).items()}
    theirs = {k.removeprefix("text_model."): v.shape for k, v in reference.state_dict().items() if "position_ids" not in k}
    assert ours == theirs
    assert sum(p.numel() for p in reference.parameters()) == parameters
