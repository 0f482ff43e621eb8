"""The frozen OpenCLIP text tower: shapes, determinism, frozenness, layer choice."""

import pytest
import torch

from ldm.models.text_encoders import FrozenOpenCLIPTextEncoder

TINY = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=3, output_dim=32)


def test_outputs_per_token_states_padded_to_the_context_length():
    encoder = FrozenOpenCLIPTextEncoder(text_cfg=TINY, seed=0)
    context = encoder(["a red circle on a white background", ""])
    assert context.shape == (2, 16, 32)
    assert encoder.output_dim == 32 and encoder.context_length == 16


def test_same_seed_same_weights_and_captions_are_told_apart():
    first = FrozenOpenCLIPTextEncoder(text_cfg=TINY, seed=3)
    second = FrozenOpenCLIPTextEncoder(text_cfg=TINY, seed=3)
    other = FrozenOpenCLIPTextEncoder(text_cfg=TINY, seed=4)
    captions = ["a red circle on a white background", "a blue circle on a white background"]
    torch.testing.assert_close(first(captions), second(captions))
    assert not torch.allclose(first(captions), other(captions))
    red, blue = first(captions)
    assert (red - blue).abs().max() > 1e-3


def test_frozen_no_gradients_and_stays_in_eval_mode():
    encoder = FrozenOpenCLIPTextEncoder(text_cfg=TINY)
    encoder.train()
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder(["x"]).requires_grad


def test_penultimate_layer_differs_from_last_and_matches_open_clip_forward():
    last = FrozenOpenCLIPTextEncoder(text_cfg=TINY, layer="last", seed=1)
    penultimate = FrozenOpenCLIPTextEncoder(text_cfg=TINY, layer="penultimate", seed=1)
    tokens = last.tokenize(["a green square"])
    embeddings, mask = last.tower._embeds(tokens)
    reference = last.tower.ln_final(last.tower.transformer(embeddings, attn_mask=mask))
    torch.testing.assert_close(last.encode_tokens(tokens), reference)
    assert not torch.allclose(penultimate.encode_tokens(tokens), reference)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="exactly one"):
        FrozenOpenCLIPTextEncoder()
    with pytest.raises(ValueError, match="layer"):
        FrozenOpenCLIPTextEncoder(text_cfg=TINY, layer="middle")
