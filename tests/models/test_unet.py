"""UNetModel and its transformer blocks on tiny configs: shapes, timesteps, gradients, checkpointing, precision."""

import math

import pytest
import torch
import torch.nn.functional as F

from ldm.models.attention import GEGLU, CrossAttention
from ldm.models.unet import UNetModel, timestep_embedding

TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=4,
            context_dim=16, norm_num_groups=8)


def tiny_unet(seed: int = 0, **overrides) -> UNetModel:
    """A tiny U-Net whose zero-initialised output layers are perturbed, so every parameter affects the output."""
    torch.manual_seed(seed)
    model = UNetModel(**{**TINY, **overrides})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def inputs(batch: int = 3, size: int = 8, context_dim: int = 16, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=generator)
    t = torch.rand(batch, generator=generator) * 999
    context = torch.randn(batch, 5, context_dim, generator=generator)
    return x, t, context


def test_timestep_embedding_is_cos_then_sin_of_geometric_frequencies():
    t = torch.tensor([0.0, 3.5])
    embedding = timestep_embedding(t, 8)
    frequencies = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(t[:, None] * frequencies), torch.sin(t[:, None] * frequencies)], dim=1)
    assert embedding.shape == (2, 8)
    torch.testing.assert_close(embedding, expected)
    assert timestep_embedding(t, 7).shape == (2, 7)  # odd width: zero-padded


@pytest.mark.parametrize("linear", [False, True])
def test_output_shape_with_context_float_timesteps_and_odd_batch(linear):
    model = tiny_unet(use_linear_in_transformer=linear)
    x, t, context = inputs(batch=3)
    out = model(x, t, context)
    assert out.shape == (3, 4, 8, 8)
    assert torch.isfinite(out).all()


def test_output_shape_without_context_and_with_head_channels():
    model = tiny_unet(context_dim=None, num_head_channels=8, out_channels=8)
    x, t, _ = inputs(batch=1)
    assert model(x, t).shape == (1, 8, 8, 8)


def test_fractional_timesteps_are_not_rounded():
    model = tiny_unet().eval()
    x, _, context = inputs(batch=1)
    outs = [model(x, torch.tensor([t]), context) for t in (500.0, 500.5, 501.0)]
    assert not torch.allclose(outs[0], outs[1])
    assert not torch.allclose(outs[1], outs[2])


def test_a_single_timestep_is_used_for_the_whole_batch():
    model = tiny_unet().eval()
    x, _, context = inputs(batch=2)
    expected = model(x, torch.tensor([250, 250]), context)
    torch.testing.assert_close(model(x, torch.tensor(250), context), expected)
    torch.testing.assert_close(model(x, torch.tensor([250]), context), expected)


def test_gradients_reach_every_parameter():
    model = tiny_unet(use_scale_shift_norm=True)
    x, t, context = inputs(batch=2)
    model(x, t, context).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_fresh_model_predicts_zero_because_output_conv_starts_at_zero():
    torch.manual_seed(0)
    model = UNetModel(**TINY)
    x, t, context = inputs(batch=2)
    assert model(x, t, context).abs().max() == 0


def test_gradient_checkpointing_gives_same_outputs_and_grads_and_recomputes():
    reference = tiny_unet(use_scale_shift_norm=True)
    checkpointed = tiny_unet(use_scale_shift_norm=True, use_checkpoint=True)
    checkpointed.load_state_dict(reference.state_dict())
    calls = []
    checkpointed.input_blocks[1][0].in_layers.register_forward_hook(lambda *args: calls.append(1))
    x, t, context = inputs(batch=2)
    outs = []
    for model in (reference, checkpointed):
        model.train()
        out = model(x, t, context)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p_ref), p_ckpt in zip(reference.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_ref.grad, msg=name)
    assert len(calls) == 2  # forward, then recomputed in backward: the checkpoint is active


def test_channels_last_keeps_nhwc_weights_and_gives_the_same_outputs_and_grads():
    reference = tiny_unet()
    nhwc = UNetModel(**TINY, channels_last=True)
    nhwc.load_state_dict(reference.state_dict())
    conv = nhwc.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x, t, context = inputs(batch=2)
    outs = []
    for model in (reference, nhwc):
        out = model(x, t, context)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    for (name, p_ref), p_nhwc in zip(reference.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(p_nhwc.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cross_attention_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    attention = CrossAttention(query_dim=12, context_dim=10, heads=3, dim_head=4)
    x, context = torch.randn(2, 6, 12), torch.randn(2, 5, 10)
    q, k, v = (t.view(2, -1, 3, 4).transpose(1, 2) for t in
               (attention.to_q(x), attention.to_k(context), attention.to_v(context)))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attention.to_out((weights @ v).transpose(1, 2).reshape(2, 6, 12))
    torch.testing.assert_close(attention(x, context), expected)


def test_geglu_is_value_times_gelu_of_gate_of_one_projection_in_values_and_gradients():
    """The two half-products give what one projection chunked into (value, gate) gives, gradients included."""
    torch.manual_seed(0)
    geglu = GEGLU(12, 20)
    x = torch.randn(2, 6, 12, requires_grad=True)
    out = geglu(x)
    grads = torch.autograd.grad(out.square().sum(), [x, geglu.proj.weight, geglu.proj.bias])
    value, gate = F.linear(x, geglu.proj.weight, geglu.proj.bias).chunk(2, dim=-1)
    expected = value * F.gelu(gate)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, geglu.proj.weight, geglu.proj.bias])
    assert out.shape == (2, 6, 20) and out.is_contiguous()
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_geglu_calls_a_wrapped_projection_as_a_module():
    """A projection that is no plain Linear (as a LoRA adapter wraps it) is called, so its extra path counts."""

    class Doubled(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return 2 * self.linear(x)

    torch.manual_seed(0)
    geglu = GEGLU(12, 20)
    x = torch.randn(2, 6, 12)
    value, gate = (2 * geglu.proj(x)).chunk(2, dim=-1)
    geglu.proj = Doubled(geglu.proj)
    torch.testing.assert_close(geglu(x), value * F.gelu(gate))


def test_attention_probs_are_the_weights_that_forward_applies():
    """attention_probs gives each query a distribution over the tokens, and mixing v with it reproduces forward."""
    torch.manual_seed(0)
    attention = CrossAttention(query_dim=12, context_dim=10, heads=3, dim_head=4)
    x, context = torch.randn(2, 6, 12), torch.randn(2, 5, 10)
    probs = attention.attention_probs(x, context)
    assert probs.shape == (2, 3, 6, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 6))
    v = attention.to_v(context).view(2, 5, 3, 4).transpose(1, 2)
    mixed = attention.to_out((probs @ v).transpose(1, 2).reshape(2, 6, 12))
    torch.testing.assert_close(attention(x, context), mixed)


@pytest.mark.parametrize("upcast", [False, True])
def test_upcast_attention_runs_attention_in_fp32_under_bf16_autocast(upcast, monkeypatch):
    model = tiny_unet(upcast_attention=upcast).eval()
    x, t, context = inputs(batch=2)
    with torch.no_grad():
        reference = model(x, t, context)
        dtypes = []
        original = F.scaled_dot_product_attention

        def recording_attention(q, k, v, *args, **kwargs):
            dtypes.append(q.dtype)
            return original(q, k, v, *args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", recording_attention)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, context)
    assert set(dtypes) == {torch.float32 if upcast else torch.bfloat16}
    assert out.dtype == torch.bfloat16
    relative_error = (out.float() - reference).norm() / reference.norm()
    assert relative_error < 0.05


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm_num_groups=6), "norm_num_groups=6"),
        (dict(num_heads=3), "num_heads=3"),
        (dict(num_head_channels=24), "num_head_channels=24"),
        (dict(attention_resolutions=(4,)), "attention_resolutions"),
    ],
)
def test_bad_configs_raise_errors_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNetModel(**{**TINY, **overrides})


def test_bad_inputs_raise_errors_saying_what_to_pass():
    model = UNetModel(**TINY)
    x, t, context = inputs(batch=1)
    with pytest.raises(ValueError, match="not divisible by 2"):
        model(torch.randn(1, 4, 7, 8), t, context)
    with pytest.raises(ValueError, match="needs context"):
        model(x, t)
    with pytest.raises(ValueError, match="needs context"):
        model(x, t, torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="context_dim=None"):
        UNetModel(**{**TINY, "context_dim": None})(x, t, context)
