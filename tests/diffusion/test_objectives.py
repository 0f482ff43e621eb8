"""Forward process, prediction-type conversions, loss weights and offset noise."""

import itertools

import pytest
import torch

from ldm.diffusion.objectives import (
    LOSS_WEIGHTINGS,
    PREDICTION_TYPES,
    convert_prediction,
    loss_weights,
    offset_noise,
    predict_x0_and_eps,
    q_sample,
    training_target,
)
from ldm.diffusion.schedules import NoiseSchedule

ALPHAS_CUMPROD = NoiseSchedule("scaled_linear").alphas_cumprod


def batch(dtype=torch.float64, size=64, seed=0):
    """Random x0, noise (size, 4, 8, 8) and t (size,) covering the whole schedule, ends included."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(size, 4, 8, 8, generator=generator, dtype=dtype)
    noise = torch.randn(size, 4, 8, 8, generator=generator, dtype=dtype)
    t = torch.randint(0, 1000, (size,), generator=generator)
    t[:2] = torch.tensor([0, 999])
    return x0, noise, t


def test_q_sample_has_the_forward_process_moments():
    """x_t = sqrt(a) x0 + sqrt(1-a) eps: with x0 = 0.7 fixed, mean sqrt(a) 0.7 and variance 1 - a.
    65,536 draws per timestep: the mean's standard error is <= 0.004, the variance's <= 0.6%; tolerance 5 SE."""
    num_draws = 4096 * 16
    for step in (0, 250, 500, 999):
        x0 = torch.full((4096, 1, 4, 4), 0.7)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(step))
        t = torch.full((4096,), step)
        x_t = q_sample(x0, t, noise, ALPHAS_CUMPROD)
        a = ALPHAS_CUMPROD[step].item()
        mean_se = ((1 - a) / num_draws) ** 0.5
        assert abs(x_t.mean().item() - a**0.5 * 0.7) < 5 * mean_se
        assert abs(x_t.var().item() / (1 - a) - 1) < 5 * (2 / num_draws) ** 0.5


def test_q_sample_keeps_the_data_dtype_with_a_float64_schedule():
    x0, noise, t = batch(torch.bfloat16, size=4)
    assert q_sample(x0, t, noise, ALPHAS_CUMPROD.double()).dtype == torch.bfloat16
    assert training_target("v_prediction", x0, noise, t, ALPHAS_CUMPROD.double()).dtype == torch.bfloat16


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_the_target_of_each_type_gives_back_x0_and_noise(prediction_type):
    x0, noise, t = batch()
    x_t = q_sample(x0, t, noise, ALPHAS_CUMPROD)
    target = training_target(prediction_type, x0, noise, t, ALPHAS_CUMPROD)
    x0_back, noise_back = predict_x0_and_eps(prediction_type, target, x_t, t, ALPHAS_CUMPROD)
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(noise_back, noise, rtol=0, atol=1e-5)


def test_v_target_is_sqrt_a_eps_minus_sqrt_one_minus_a_x0():
    x0, noise, t = batch()
    a = ALPHAS_CUMPROD[t].double().view(-1, 1, 1, 1)
    expected = a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(training_target("v_prediction", x0, noise, t, ALPHAS_CUMPROD), expected)


@pytest.mark.parametrize("chain", list(itertools.permutations(PREDICTION_TYPES)))
def test_conversions_round_trip_exactly(chain):
    """eps -> v -> x0 -> eps (every order) returns the starting prediction to 1e-5, at every t (float64)."""
    x0, noise, t = batch()
    x_t = q_sample(x0, t, noise, ALPHAS_CUMPROD)
    start = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    prediction = start
    for from_type, to_type in zip(chain, chain[1:] + chain[:1]):
        prediction = convert_prediction(prediction, x_t, t, ALPHAS_CUMPROD, from_type, to_type)
    torch.testing.assert_close(prediction, start, rtol=0, atol=1e-5)


def test_conversions_match_diffusers_velocity_and_add_noise():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise, t = batch(torch.float32)
    torch.testing.assert_close(q_sample(x0, t, noise, ALPHAS_CUMPROD), scheduler.add_noise(x0, noise, t))
    torch.testing.assert_close(
        training_target("v_prediction", x0, noise, t, ALPHAS_CUMPROD), scheduler.get_velocity(x0, noise, t)
    )


def per_sample_mse(a, b):
    return ((a - b) ** 2).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("as_type", PREDICTION_TYPES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_snr_weights_make_each_type_train_the_loss_of_another(prediction_type, as_type):
    """weight * MSE(output, target) of one type == MSE of the same prediction expressed as ``as_type``."""
    x0, noise, t = batch()
    t = t.clamp(max=998)  # keep SNR > 0 so every weight is finite
    x_t = q_sample(x0, t, noise, ALPHAS_CUMPROD)
    output = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weighted = loss_weights(f"snr_as_{as_type}", t, ALPHAS_CUMPROD, prediction_type) * per_sample_mse(
        output, training_target(prediction_type, x0, noise, t, ALPHAS_CUMPROD)
    )
    converted = convert_prediction(output, x_t, t, ALPHAS_CUMPROD, prediction_type, as_type)
    expected = per_sample_mse(converted, training_target(as_type, x0, noise, t, ALPHAS_CUMPROD))
    torch.testing.assert_close(weighted.double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weights_the_x0_error_by_min_snr_gamma(prediction_type):
    """Min-SNR-5 on any type == min(SNR, 5) * MSE of the implied x0."""
    x0, noise, t = batch()
    t = t.clamp(max=998)
    x_t = q_sample(x0, t, noise, ALPHAS_CUMPROD)
    output = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights = loss_weights("min_snr", t, ALPHAS_CUMPROD, prediction_type, snr_gamma=5.0)
    weighted = weights * per_sample_mse(output, training_target(prediction_type, x0, noise, t, ALPHAS_CUMPROD))
    x0_error = per_sample_mse(predict_x0_and_eps(prediction_type, output, x_t, t, ALPHAS_CUMPROD)[0], x0)
    snr = ALPHAS_CUMPROD[t] / (1 - ALPHAS_CUMPROD[t])
    torch.testing.assert_close(weighted.double(), snr.clamp(max=5.0).double() * x0_error, rtol=1e-4, atol=0)


def test_loss_weights_at_zero_terminal_snr():
    alphas_cumprod = NoiseSchedule("scaled_linear", zero_terminal_snr=True).alphas_cumprod
    last = torch.tensor([999])
    assert loss_weights("min_snr", last, alphas_cumprod, "epsilon").item() == 1.0  # min(SNR, g)/SNR -> 1
    assert loss_weights("min_snr", last, alphas_cumprod, "v_prediction").item() == 0.0
    assert loss_weights("uniform", last, alphas_cumprod, "v_prediction").item() == 1.0


def test_bad_names_say_what_is_valid():
    x0, noise, t = batch(size=2)
    with pytest.raises(ValueError, match="epsilon"):
        training_target("eps", x0, noise, t, ALPHAS_CUMPROD)
    with pytest.raises(ValueError, match="min_snr"):
        loss_weights("p2", t, ALPHAS_CUMPROD, "epsilon")
    assert set(LOSS_WEIGHTINGS) >= {"uniform", "min_snr"}


def test_offset_noise_adds_a_per_channel_constant():
    """Per (sample, channel) the spatial mean has variance 1/HW + strength^2 (0.1^2 here): over 16,384
    (sample, channel) means the variance's standard error is 1.1%; tolerance 5 SE. Without offset: plain randn."""
    shape = (4096, 4, 16, 16)
    noise = offset_noise(shape, 0.1, generator=torch.Generator().manual_seed(0))
    assert noise.shape == shape
    channel_means = noise.mean(dim=(2, 3))
    expected = 1 / 256 + 0.1**2
    assert abs(channel_means.var().item() / expected - 1) < 5 * (2 / channel_means.numel()) ** 0.5
    plain = offset_noise((2, 4, 8, 8), 0.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain, torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_functions_move_a_cpu_schedule_to_the_data_device():
    x0, noise, t = (v.cuda() for v in batch(torch.float32, size=4))
    x_t = q_sample(x0, t, noise, ALPHAS_CUMPROD)
    target = training_target("v_prediction", x0, noise, t, ALPHAS_CUMPROD)
    weights = loss_weights("min_snr", t, ALPHAS_CUMPROD, "v_prediction")
    assert x_t.is_cuda and target.is_cuda and weights.is_cuda
    torch.testing.assert_close(x_t.cpu(), q_sample(x0.cpu(), t.cpu(), noise.cpu(), ALPHAS_CUMPROD))
