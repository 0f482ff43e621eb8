"""AutoencoderKL on tiny configs: shapes, the diagonal Gaussian posterior, config errors."""

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL, DiagonalGaussianDistribution

TINY = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=8, resolution=32)


@pytest.mark.parametrize("attn_resolutions", [(), (16,)])
def test_encode_decode_shapes(attn_resolutions):
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY, attn_resolutions=attn_resolutions)
    assert vae.downsample_factor == 4
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    posterior = vae.encode(images)
    assert posterior.mean.shape == posterior.std.shape == (3, 4, 8, 8)
    assert vae.decode(posterior.sample()).shape == (3, 3, 32, 32)
    if attn_resolutions:  # one block per encoder level, two per decoder level, at 16x16 only
        assert sum(len(stage.attn) for stage in vae.encoder.down) == 1
        assert sum(len(stage.attn) for stage in vae.decoder.up) == 2


def test_forward_uses_the_mode_when_not_sampling():
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY, embed_dim=3)
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    reconstruction, posterior = vae(images, sample_posterior=False)
    assert posterior.mode().shape == (2, 3, 4, 6)
    torch.testing.assert_close(reconstruction, vae.decode(posterior.mode()))


def test_posterior_sample_is_mean_plus_std_times_the_generators_noise():
    moments = torch.randn(2, 8, 4, 4)
    posterior = DiagonalGaussianDistribution(moments)
    first = posterior.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(posterior.sample(torch.Generator().manual_seed(7)), first)
    assert not torch.allclose(posterior.sample(torch.Generator().manual_seed(8)), first)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, moments[:, :4] + torch.exp(0.5 * moments[:, 4:]) * noise)


def test_forward_with_generator_is_deterministic():
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    first, _ = vae(images, generator=torch.Generator().manual_seed(3))
    second, _ = vae(images, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, second)


def test_kl_is_zero_for_standard_normal_and_positive_otherwise():
    assert DiagonalGaussianDistribution(torch.zeros(2, 8, 3, 3)).kl().abs().max() == 0
    kl = DiagonalGaussianDistribution(torch.randn(5, 8, 3, 3)).kl()
    assert kl.shape == (5,) and (kl > 0).all()
    # mean 1, variance e: per element 0.5 * (1 + e - 1 - 1), summed over 4 * 3 * 3 elements
    moments = torch.cat([torch.ones(1, 4, 3, 3), torch.ones(1, 4, 3, 3)], dim=1)
    torch.testing.assert_close(DiagonalGaussianDistribution(moments).kl(), torch.tensor([18 * (torch.e - 1)]))


def test_log_variance_is_clamped():
    moments = torch.cat([torch.zeros(1, 1, 1, 2), torch.tensor([[[[-100.0, 100.0]]]])], dim=1)
    posterior = DiagonalGaussianDistribution(moments)
    torch.testing.assert_close(posterior.logvar, torch.tensor([[[[-30.0, 20.0]]]]))
    assert torch.isfinite(posterior.kl()).all()


def test_norm_groups_that_do_not_divide_the_channels_raise():
    with pytest.raises(ValueError, match="norm_num_groups=12"):
        AutoencoderKL(**{**TINY, "norm_num_groups": 12})
