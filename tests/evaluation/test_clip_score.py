"""CLIP score through torchmetrics over an open_clip model (a tiny random one: no pretrained weights offline)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from ldm.evaluation.clip_score import build_open_clip, open_clip_score

TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
            text_cfg=dict(context_length=16, width=64, heads=2, layers=2))


def test_clip_score_is_100_times_the_clamped_mean_cosine_of_open_clip_embeddings():
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    captions = [f"a {c} circle on a white background" for c in ("red", "green", "blue", "cyan", "yellow", "magenta")]
    metric = open_clip_score(model_name=None, model_cfg=TINY, seed=0)
    metric.update(images, captions)
    model, tokenizer = build_open_clip(None, None, TINY, seed=0)
    with torch.no_grad():
        image_embeddings = F.normalize(model.encode_image((images - torch.tensor(
            (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)) / torch.tensor(
            (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)), dim=-1)
        text_embeddings = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    expected = max(0.0, float(100 * (image_embeddings * text_embeddings).sum(-1).mean()))
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-3)


def test_clip_model_choice_is_validated_and_seeded():
    with pytest.raises(ValueError, match="exactly one of model_name"):
        build_open_clip("ViT-B-32", None, TINY)
    first, _ = build_open_clip(None, None, TINY, seed=1)
    second, _ = build_open_clip(None, None, TINY, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    metric = open_clip_score(model_name=None, model_cfg=TINY)
    with pytest.raises(ValueError, match=r"floats in \[0, 1\]"):
        metric.update(torch.full((1, 3, 32, 32), 200.0), ["a red circle on a white background"])
