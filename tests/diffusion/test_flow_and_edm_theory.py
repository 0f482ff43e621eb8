"""Flow matching and EDM driven by the exact denoisers of Gaussian data, whose answers theory gives in closed form.

For x0 ~ N(mu, s^2 I):
- flow matching, x_t = (1 - t) x0 + t eps: E[x0 | x_t] = mu + (1 - t) s^2 (x_t - (1 - t) mu) / ((1 - t)^2 s^2 + t^2),
  and the optimal velocity is (x_t - E[x0 | x_t]) / t;
- EDM, x = x0 + sigma eps: D(x; sigma) = mu + s^2 (x - mu) / (s^2 + sigma^2), and F = (D - c_skip x) / c_out.
Both ODE samplers are then affine maps of the initial noise z, so running them on z in {-1, 0, 1} in float64
gives their output distribution exactly; the Monte Carlo tests add only the sampling error of real noise.
"""

import math

import pytest
import torch

from ldm.diffusion.edm import (
    edm_denoised,
    edm_loss_weight,
    edm_model_input,
    edm_preconditioning,
    edm_sigmas_from_quantiles,
    edm_training_target,
    sample_edm,
)
from ldm.diffusion.flow_matching import (
    flow_interpolate,
    flow_sampling_times,
    flow_time_to_sigma,
    flow_timesteps_from_quantiles,
    flow_velocity_target,
    resolution_shift,
    sample_flow_euler,
    sample_flow_heun,
    shift_timesteps,
    velocity_from_x0,
    x0_and_noise_from_velocity,
)
from ldm.diffusion.karras import sample_karras
from ldm.diffusion.objectives import x0_and_eps_from_prediction
from ldm.diffusion.sampling import sample

MU, STD = 0.5, 1.0
Z = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).view(3, 1, 1, 1)


def flow_velocity(mu, std, num_train_timesteps=1000):
    """The optimal velocity for N(mu, std^2) data; the model is told t * num_train_timesteps."""

    def denoise(x, timesteps):
        t = (timesteps.double() / num_train_timesteps).view(-1, 1, 1, 1)
        x = x.double()
        x0 = mu + (1 - t) * std**2 * (x - (1 - t) * mu) / ((1 - t) ** 2 * std**2 + t**2)
        return (x - x0) / t

    return denoise


def edm_network(mu, std, sigma_data=1.0):
    """The optimal F for N(mu, std^2) data, called as the sampler calls it: (c_in x, c_noise)."""

    def denoise(model_input, c_noise):
        sigma = torch.exp(4 * c_noise.double()).view(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = edm_preconditioning(sigma, sigma_data)
        x = model_input.double() / c_in
        return (mu + std**2 * (x - mu) / (std**2 + sigma**2) - c_skip * x) / c_out

    return denoise


def affine_map(run):
    """(intercept, slope) of a deterministic sampler's output as a function of its initial noise."""
    out = run(Z).flatten()
    return out[1].item(), (out[2] - out[0]).item() / 2


# ---------------------------------------------------------------------------- moments of the samples
NUM_SAMPLES = 4000 * 4


def assert_moments(samples, exact_mean, exact_variance):
    """Mean and variance within 4 standard errors of what the sampler's exact affine map gives:
    SE of the mean STD / sqrt(N) = 0.0079, of the relative variance sqrt(2 / (N - 1)) = 1.1% (N = 16,000)."""
    samples = samples.double()
    mean_tolerance = 4 * STD / math.sqrt(NUM_SAMPLES)
    variance_tolerance = 4 * math.sqrt(2 / (NUM_SAMPLES - 1)) * exact_variance
    assert abs(samples.mean().item() - exact_mean) <= mean_tolerance
    assert abs(samples.var().item() - exact_variance) <= variance_tolerance


def gaussian_noise():
    return torch.randn(4000, 4, 1, 1, generator=torch.Generator().manual_seed(0))


def test_flow_euler_50_steps_reproduces_gaussian_data():
    """Flow Euler at 50 steps (50 calls) from pure noise at t = 1: the mean is exact (the map fixes mu, to
    1e-6), the variance is the data's within 6%: Euler is first order, and its bias here, -5.1%, falls like
    1 / steps (next test). The 16,000 samples match the exact map within 4 SE."""
    denoise = flow_velocity(MU, STD)
    intercept, slope = affine_map(lambda z: sample_flow_euler(denoise, z, 50))
    assert abs(intercept - MU) < 1e-6
    assert abs(slope**2 / STD**2 - 1) < 0.06
    samples = sample("flow_euler", denoise, gaussian_noise(), torch.zeros(1000), 50, prediction_type="flow")
    assert_moments(samples, intercept, slope**2)


def test_edm_heun_18_steps_35_calls_reproduces_gaussian_data():
    """EDM's Heun (Algorithm 2) at 18 steps makes 35 model calls. Its start x = 80 z lacks the data mean, so
    the exact flow ends at mean mu (1 - s / sqrt(s^2 + 80^2)) = mu - 0.0062 and variance 0.99984 s^2; the
    sampler's own bias is then within 10% of the variance (observed +9.1%: Heun is second order, next test,
    but rho = 7 puts few steps near sigma ~ s where this flow bends). Samples match the exact map within 4 SE."""
    calls = []
    network = edm_network(MU, STD)

    def counting(x, c_noise):
        calls.append(1)
        return network(x, c_noise)

    intercept, slope = affine_map(lambda z: sample_edm(counting, z, 18))
    assert len(calls) == 35
    flow_mean = MU * (1 - STD / math.sqrt(STD**2 + 80**2))
    flow_variance = 80**2 * STD**2 / (STD**2 + 80**2)
    assert abs(intercept - flow_mean) < 1e-3
    assert abs(slope**2 / flow_variance - 1) < 0.10
    samples = sample("edm_heun", network, gaussian_noise(), torch.zeros(1000), 18, prediction_type="edm")
    assert_moments(samples, intercept, slope**2)


def test_edm_heun_with_churn_reproduces_gaussian_data():
    """Algorithm 2 with the paper's ImageNet churn (S_churn 40, S_tmin 0.05, S_tmax 50) re-noises and so is
    stochastic; it is consistent, but its bias falls slowly with the step count (variance +22% at 18 steps,
    +4% at 64, -1.4% at 256, seen here). At 256 steps: the mean within 4 SE of mu less the finite-sigma_max
    shift 0.0062, the variance within 4 SE plus 3% of the data's."""
    samples = sample("edm_heun", edm_network(MU, STD), gaussian_noise(), torch.zeros(1000), 256,
                     prediction_type="edm", s_churn=40.0, s_tmin=0.05, s_tmax=50.0,
                     generator=torch.Generator().manual_seed(1)).double()
    flow_mean = MU * (1 - STD / math.sqrt(STD**2 + 80**2))
    assert abs(samples.mean().item() - flow_mean) <= 4 * STD / math.sqrt(NUM_SAMPLES)
    assert abs(samples.var().item() / STD**2 - 1) <= 4 * math.sqrt(2 / (NUM_SAMPLES - 1)) + 0.03


def test_flow_heun_18_steps_is_nearly_exact():
    """Flow Heun at 18 steps (35 calls) on the straight-line path: the variance bias is below 0.1%
    (observed -0.03%), as the exact velocity field of Gaussian data is smooth in t."""
    intercept, slope = affine_map(lambda z: sample_flow_heun(flow_velocity(MU, STD), z, 18))
    assert abs(intercept - MU) < 1e-6 and abs(slope**2 - 1) < 1e-3


@pytest.mark.parametrize(
    "name, run, exact_slope, order",
    [
        ("flow_euler", lambda n: sample_flow_euler(flow_velocity(MU, 0.3), Z, n), 0.3, 1),
        ("flow_heun", lambda n: sample_flow_heun(flow_velocity(MU, 0.3), Z, n), 0.3, 2),
        ("edm_heun", lambda n: sample_edm(edm_network(MU, 0.3), Z, n), 80 * 0.3 / math.sqrt(0.09 + 6400), 2),
    ],
)
def test_samplers_converge_at_their_order(name, run, exact_slope, order):
    """Quadrupling the steps divides the slope error by about 4^order (at least 4^order / 1.6, for the
    higher-order terms still present at these step counts); narrow data (s = 0.3) bends the flow most."""
    errors = [abs(affine_map(lambda z, n=n: run(n))[1] - exact_slope) for n in (25, 100)]
    assert errors[1] < errors[0] / (4**order / 1.6), errors


# ----------------------------------------------------------------------- exact parametrisations
def test_flow_conversions_are_exact_inverses():
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 5, 3, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.rand(5, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    x_t = flow_interpolate(x0, noise, t)
    velocity = flow_velocity_target(x0, noise)
    x0_back, noise_back = x0_and_noise_from_velocity(velocity, x_t, t)
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(noise_back, noise, rtol=0, atol=1e-14)
    torch.testing.assert_close(velocity_from_x0(x0, x_t, t), velocity, rtol=0, atol=1e-13)


def test_flow_state_is_a_scaled_variance_preserving_state():
    """x_t / sqrt((1 - t)^2 + t^2) is the VP state at alpha_cumprod = (1 - t)^2 / ((1 - t)^2 + t^2); the
    velocity then gives the same x0 and eps as an epsilon prediction there."""
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64).view(-1, 1)
    scale = ((1 - t) ** 2 + t**2).sqrt()
    x_vp = flow_interpolate(x0, noise, t.flatten()) / scale
    a = (1 - t) ** 2 / scale**2
    x0_vp, eps_vp = x0_and_eps_from_prediction("epsilon", noise, x_vp, a)
    torch.testing.assert_close(x0_vp, x0, rtol=0, atol=1e-12)
    assert flow_time_to_sigma(0.5) == 1.0


def test_edm_preconditioning_exact_and_unit_variance():
    """D(target F) is x0 exactly; lambda c_out^2 = 1; and for data of std sigma_data the network's input
    c_in x and its target F both have unit variance at every sigma (the point of EDM's Table 1)."""
    sigma_data = 0.5
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    x0 = sigma_data * torch.randn(5, 200_000, generator=generator, dtype=torch.float64)
    noise = torch.randn(5, 200_000, generator=generator, dtype=torch.float64)
    x = x0 + sigma.view(-1, 1) * noise
    target = edm_training_target(x0, noise, sigma, sigma_data)
    torch.testing.assert_close(edm_denoised(target, x, sigma, sigma_data), x0, rtol=0, atol=1e-10)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sigma_data)
    torch.testing.assert_close(edm_loss_weight(sigma, sigma_data) * c_out**2, torch.ones_like(sigma))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    model_input, _ = edm_model_input(x, sigma, sigma_data)
    # 4 standard errors of a variance estimate from 200,000 values: 4 * sqrt(2 / N) = 1.3%.
    torch.testing.assert_close(model_input.var(dim=1), torch.ones(5, dtype=torch.float64), rtol=0.013, atol=0)
    torch.testing.assert_close(target.var(dim=1), torch.ones(5, dtype=torch.float64), rtol=0.013, atol=0)


def test_flow_euler_equals_edm_euler_under_sigma_equals_t_over_1_minus_t():
    """Euler on the straight path is DDIM, which is invariant to the time variable: with the same noise
    levels sigma = t / (1 - t) and x_sigma = x_t / (1 - t), flow Euler and Karras Euler (no churn) agree
    to float64 precision at every step."""
    denoise = flow_velocity(MU, 0.3)
    times = flow_sampling_times(20, shift=3.0)[:-1]
    flow_steps = []
    sample_flow_euler(denoise, Z, 20, shift=3.0, callback=lambda i, x, x0: flow_steps.append(x))

    def denoised(x, sigma):
        t = sigma / (1 + sigma)
        x_t = x * (1 - t)
        velocity = denoise(x_t, torch.full((3,), t * 1000, dtype=torch.float32))  # as the sampler tells it
        return x0_and_noise_from_velocity(velocity, x_t, t)[0]

    # The flow starts at t = 1 (sigma infinite): compare from the state after the first step on.
    sigmas = torch.cat([flow_time_to_sigma(times[1:]), torch.zeros(1, dtype=torch.float64)])
    karras_steps = []
    sample_karras(denoised, flow_steps[0] / (1 - times[1].item()), sigmas, second_order=False,
                  callback=lambda i, x, x0: karras_steps.append(x))
    next_times = torch.cat([times[2:], torch.zeros(1, dtype=torch.float64)]).tolist()
    assert len(karras_steps) == len(flow_steps) - 1 == len(next_times)
    for flow_x, karras_x, t_next in zip(flow_steps[1:], karras_steps, next_times):
        torch.testing.assert_close(flow_x, karras_x * (1 - t_next), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- noise levels
def test_logit_normal_and_mode_timesteps():
    """logit(t) of logit-normal times has the configured mean and std (4 SE over 100,000 draws); the "mode"
    map is the SD 3 formula, a bijection of [0, 1] with f(0) = 1 and f(1) = 0, and scale 0 is uniform."""
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    logits = torch.logit(flow_timesteps_from_quantiles(u, "logit_normal", 0.5, 1.5))
    assert abs(logits.mean().item() - 0.5) < 4 * 1.5 / math.sqrt(1e5)
    assert abs(logits.std().item() / 1.5 - 1) < 4 * math.sqrt(0.5 / 1e5)
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    mode = flow_timesteps_from_quantiles(grid, "mode", mode_scale=1.29)
    torch.testing.assert_close(mode, 1 - grid - 1.29 * (torch.cos(math.pi * grid / 2) ** 2 - 1 + grid))
    assert mode[0] == 1 and abs(mode[-1].item()) < 1e-12 and (mode.diff() < 0).all()
    torch.testing.assert_close(flow_timesteps_from_quantiles(grid, "mode", mode_scale=0.0), 1 - grid)


def test_shift_divides_the_snr_by_shift_squared():
    """SD 3's shift: sigma(t') = shift * sigma(t), so the SNR falls by shift^2 at every t; resolution_shift
    of 4x the pixels is 2."""
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(flow_time_to_sigma(shift_timesteps(t, 3.0)), 3.0 * flow_time_to_sigma(t))
    assert resolution_shift(1024 * 1024, 512 * 512) == 2.0
    with pytest.raises(ValueError, match="shift=0"):
        shift_timesteps(t, 0)


def test_edm_sigmas_are_log_normal():
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(4), dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    log_sigma = edm_sigmas_from_quantiles(u, -1.2, 1.2).log()
    assert abs(log_sigma.mean().item() + 1.2) < 4 * 1.2 / math.sqrt(1e5)
    assert abs(log_sigma.std().item() / 1.2 - 1) < 4 * math.sqrt(0.5 / 1e5)
