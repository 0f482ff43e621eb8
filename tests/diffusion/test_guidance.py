"""Classifier-free guidance: one batched forward, the guidance formula, and guidance rescale."""

import pytest
import torch

from ldm.conditioning import Conditioning
from ldm.diffusion.guidance import classifier_free_guidance


class CountingModel:
    """model(x, t, cond) = x * mean(cond.tokens) + t / 1000, recording the batch of every call."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, t, cond):
        context = cond.tokens
        self.batch_sizes.append(x.shape[0])
        assert context.shape[0] == x.shape[0] == t.shape[0]
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000


def inputs(batch_size=3):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 4, 8, 8, generator=generator)
    t = torch.full((batch_size,), 500.0)
    context = Conditioning(torch.randn(batch_size, 7, 16, generator=generator) + 1.0)
    uncond_context = Conditioning(torch.randn(1, 7, 16, generator=generator))
    return x, t, context, uncond_context


@pytest.mark.parametrize("uncond_batch", [1, 3])
def test_guidance_runs_one_batched_forward_and_extrapolates(uncond_batch):
    x, t, context, uncond_context = inputs()
    uncond_context = uncond_context.expand(uncond_batch)
    model = CountingModel()
    guided = classifier_free_guidance(model, context, uncond_context, guidance_scale=7.5)(x, t)
    assert model.batch_sizes == [6]
    conditional = CountingModel()(x, t, context)
    unconditional = CountingModel()(x, t, uncond_context.expand(3))
    torch.testing.assert_close(guided, unconditional + 7.5 * (conditional - unconditional))


def test_scale_one_is_the_conditional_output_from_a_conditional_only_forward():
    x, t, context, uncond_context = inputs()
    model = CountingModel()
    guided = classifier_free_guidance(model, context, uncond_context, guidance_scale=1.0)(x, t)
    assert model.batch_sizes == [3]
    torch.testing.assert_close(guided, CountingModel()(x, t, context))


def test_rescale_matches_the_conditional_std_and_blends_by_phi():
    """phi = 1: the guided output's per-sample std equals the conditional one's (direction kept);
    phi = 0.7: 0.7 * rescaled + 0.3 * plain guided output (Lin et al. 2023, eq. 16)."""
    x, t, context, uncond_context = inputs()
    model = CountingModel()
    plain = classifier_free_guidance(model, context, uncond_context, 7.5)(x, t)
    full = classifier_free_guidance(model, context, uncond_context, 7.5, guidance_rescale=1.0)(x, t)
    partial = classifier_free_guidance(model, context, uncond_context, 7.5, guidance_rescale=0.7)(x, t)
    conditional = model(x, t, context)
    dims = (1, 2, 3)
    torch.testing.assert_close(full.std(dim=dims), conditional.std(dim=dims))
    ratio = full / plain
    torch.testing.assert_close(ratio, ratio[:, :1, :1, :1].expand_as(ratio))  # a per-sample positive scale
    assert (ratio > 0).all() and not torch.allclose(full, plain)
    torch.testing.assert_close(partial, 0.7 * full + 0.3 * plain)


def test_mismatched_uncond_batch_is_refused():
    x, t, context, _ = inputs()
    with pytest.raises(ValueError, match="unconditional conditioning has batch 2"):
        classifier_free_guidance(CountingModel(), context, Conditioning(torch.zeros(2, 7, 16)), 5.0)
