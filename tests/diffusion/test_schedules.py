"""Noise schedules: shape of alphas_cumprod, zero terminal SNR, and equality with diffusers' DDPMScheduler."""

import pytest
import torch

from ldm.diffusion.schedules import (
    NoiseSchedule,
    cosine_betas,
    linear_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
)

SCHEDULE_ARGS = {
    "linear": dict(beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
    "cosine": {},
}


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("name", sorted(SCHEDULE_ARGS))
def test_alphas_cumprod_decreases_strictly_inside_zero_one(name, zero_terminal_snr):
    schedule = NoiseSchedule(name, 1000, zero_terminal_snr=zero_terminal_snr, **SCHEDULE_ARGS[name])
    alphas_cumprod = schedule.alphas_cumprod
    assert alphas_cumprod.shape == (1000,) and alphas_cumprod.dtype == torch.float32
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    assert alphas_cumprod[0] < 1
    inner = alphas_cumprod[:-1] if zero_terminal_snr else alphas_cumprod
    assert (inner > 0).all()
    # snr and sigmas are computed in float64; recomputed here from float32 1 - a near a = 1 they lose ~1e-4.
    torch.testing.assert_close(schedule.snr, alphas_cumprod / (1 - alphas_cumprod), rtol=1e-3, atol=0)
    torch.testing.assert_close(schedule.sigmas[:-1], ((1 - alphas_cumprod) / alphas_cumprod).sqrt()[:-1], rtol=1e-3, atol=0)
    torch.testing.assert_close(schedule.alphas, 1 - schedule.betas)


@pytest.mark.parametrize("betas", [linear_betas(), scaled_linear_betas(), cosine_betas()], ids=["linear", "scaled", "cos"])
def test_zero_terminal_snr_makes_last_snr_exactly_zero_and_keeps_the_first(betas):
    rescaled = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1 - rescaled, 0)
    assert alphas_cumprod[-1] == 0.0
    assert rescaled[-1] == 1.0
    torch.testing.assert_close(alphas_cumprod[0], torch.cumprod(1 - betas, 0)[0])
    schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    assert schedule.snr[-1] == 0.0 and schedule.alphas_cumprod[-1] == 0.0
    assert torch.isinf(schedule.sigmas[-1])


def test_schedule_formulas():
    """linear: evenly spaced betas; scaled_linear: evenly spaced sqrt(betas); cosine: alpha_bar = cos^2 law."""
    betas = linear_betas(5, 0.1, 0.5)
    torch.testing.assert_close(betas, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64))
    sqrt_betas = scaled_linear_betas(5, 0.01, 0.25).sqrt()
    torch.testing.assert_close(sqrt_betas, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64))
    alphas_cumprod = torch.cumprod(1 - cosine_betas(100), 0)
    u = torch.arange(1, 101, dtype=torch.float64) / 100
    expected = torch.cos((u + 0.008) / 1.008 * torch.pi / 2) ** 2 / torch.cos(torch.tensor(0.008 / 1.008 * torch.pi / 2)) ** 2
    torch.testing.assert_close(alphas_cumprod[:-1], expected[:-1])  # the last beta is capped at 0.999


def test_unknown_schedule_names_the_valid_ones():
    with pytest.raises(ValueError, match="cosine.*linear.*scaled_linear"):
        NoiseSchedule("quadratic")


DIFFUSERS_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("name", sorted(DIFFUSERS_NAMES))
def test_betas_and_alphas_cumprod_equal_diffusers(name, zero_terminal_snr):
    """Same betas and alphas_cumprod as DDPMScheduler to 1e-6 (betas to 1e-5 after the zero-SNR rescale,
    where diffusers' float32 ratios of tiny alphas_cumprod lose ~7e-6; ldm computes in float64)."""
    diffusers = pytest.importorskip("diffusers")
    args = SCHEDULE_ARGS[name]
    reference = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=DIFFUSERS_NAMES[name],
        rescale_betas_zero_snr=zero_terminal_snr,
        **args,
    )
    schedule = NoiseSchedule(name, 1000, zero_terminal_snr=zero_terminal_snr, **args)
    torch.testing.assert_close(schedule.betas, reference.betas, rtol=0, atol=1e-5 if zero_terminal_snr else 1e-6)
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod, rtol=0, atol=1e-6)
