"""Samplers driven by the exact denoiser of Gaussian data, whose answers theory gives in closed form.

For x0 ~ N(mu, s^2 I) and x_t = sqrt(a) x0 + sqrt(1 - a) eps, the optimal (posterior-mean) predictions are
    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)
    E[x0 | x_t]  = mu + sqrt(a) s^2 (x_t - sqrt(a) mu) / (a s^2 + 1 - a)
    E[v | x_t]   = sqrt(a) E[eps | x_t] - sqrt(1 - a) E[x0 | x_t].
The test denoiser returns one of these, at the noise level a that the timestep it is given stands for
(fractional timesteps, which Euler-type samplers use, interpolate sigma = sqrt((1 - a) / a) linearly).
"""

import math

import numpy as np
import pytest
import torch

from ldm.diffusion.objectives import PREDICTION_TYPES
from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.sampling import sample
from ldm.diffusion.timesteps import make_timesteps
from ldm.diffusion.schedules import NoiseSchedule

SD_SCHEDULE = NoiseSchedule("scaled_linear")
ZERO_SNR_SCHEDULE = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
# The discrete-schedule samplers (heun is proven against diffusers in test_flow_and_edm_vs_diffusers.py).
USUAL_STEPS = {"ddpm": 1000, "ddim": 50, "euler": 50, "euler_ancestral": 50, "dpmpp_2m": 20}


def gaussian_denoiser(alphas_cumprod, prediction_type, mu, std):
    """The exact optimal model output of ``prediction_type`` for data N(mu, std^2), computed in float64."""
    alphas_cumprod = alphas_cumprod.double().numpy()
    alphas_cumprod = np.where(alphas_cumprod > 0, alphas_cumprod, 2.0**-24)  # a finite sigma at SNR 0
    train_sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)

    def denoise(x, t):
        sigma = np.interp(t.double().cpu().numpy(), np.arange(len(train_sigmas)), train_sigmas)
        a = torch.from_numpy(1 / (1 + sigma**2)).view(-1, 1, 1, 1)
        x_t = x.double()
        variance = a * std**2 + 1 - a
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * mu) / variance
        x0 = mu + a.sqrt() * std**2 * (x_t - a.sqrt() * mu) / variance
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        return {"epsilon": eps, "sample": x0, "v_prediction": v}[prediction_type].to(x.dtype)

    return denoise


# ------------------------------------------------------------------------ moments of the samples
MU, STD = 0.5, 1.0
NUM_SAMPLES = 4000 * 4
# Discretisation bias of each sampler at its usual step count for this data: (mean - MU, var / STD^2 - 1),
# measured with the same exact denoiser on 10^6 (SD schedule) and 3 * 10^5 (zero-SNR) float64 samples.
# On the SD schedule the ODE samplers' mean bias is mostly the schedule's nonzero terminal SNR: starting
# from N(0, I) rather than N(sqrt(a_T) mu, ...) shifts the result by -sqrt(a_T) mu s / sqrt(a_T s^2 + 1 - a_T)
# = -0.034 here; the stochastic samplers forget most of it. The variance bias is each method's own: the
# last step returns E[x0 | x_t] at the smallest noise level, and Euler ancestral at 50 steps is the coarsest.
OBSERVED_BIAS = {
    "sd": {
        "ddpm": (-0.0019, -0.0082),
        "ddim": (-0.0369, -0.0544),
        "euler": (-0.0329, -0.0599),
        "euler_ancestral": (-0.0013, -0.1110),
        "dpmpp_2m": (-0.0332, -0.0396),
    },
    "zero_snr": {
        "ddpm": (0.0002, -0.0137),
        "ddim": (-0.0001, -0.0637),
        "euler": (-0.0002, -0.0637),
        "euler_ancestral": (-0.0002, -0.1128),
        "dpmpp_2m": (-0.0002, -0.0432),
    },
}


def assert_moments_match_the_data(samples, bias):
    """|mean - MU| <= 4 SE + |observed bias| + 0.005 and |var / STD^2 - 1| <= 4 SE + |observed bias| + 0.01.

    SE over NUM_SAMPLES = 16,000 values: STD / sqrt(N) = 0.0079 for the mean, sqrt(2 / (N - 1)) = 1.1% for the
    relative variance. The margins cover the bias measurements' own error (<= 4 of their SEs: 0.004 / 0.005
    at 10^6 samples, 0.007 / 0.01 at 3 * 10^5)."""
    samples = samples.double()
    mean_error, variance_error = samples.mean().item() - MU, samples.var().item() / STD**2 - 1
    mean_tolerance = 4 * STD / math.sqrt(NUM_SAMPLES) + abs(bias[0]) + 0.005
    variance_tolerance = 4 * math.sqrt(2 / (NUM_SAMPLES - 1)) + abs(bias[1]) + 0.01
    assert abs(mean_error) <= mean_tolerance, f"mean off by {mean_error:+.4f} (tolerance {mean_tolerance:.4f})"
    assert abs(variance_error) <= variance_tolerance, (
        f"variance off by {variance_error:+.2%} (tolerance {variance_tolerance:.2%})"
    )


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("sampler", sorted(USUAL_STEPS))
def test_sampler_reproduces_gaussian_data_moments(sampler, prediction_type):
    """Each sampler at its usual step count (DDPM 1000, DDIM 50, Euler 50, Euler ancestral 50,
    DPM-Solver++ 20), default spacing, SD schedule, driven by the exact denoiser of N(0.5, 1):
    the 16,000 samples (4000 x 4) have the data's mean and variance within 4 standard errors plus the
    observed discretisation bias (see assert_moments_match_the_data).
    s = 1 as for SD latents, which latent_scale_factor scales to unit variance; for narrow data
    (s = 0.3) these step counts shrink the variance by 16-36%, which the closed-form DDIM test below
    explains, so that is no fault of the samplers."""
    noise = torch.randn(4000, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    denoise = gaussian_denoiser(SD_SCHEDULE.alphas_cumprod, prediction_type, MU, STD)
    samples = sample(sampler, denoise, noise, SD_SCHEDULE.alphas_cumprod, USUAL_STEPS[sampler],
                     prediction_type=prediction_type, generator=torch.Generator().manual_seed(1))
    assert samples.shape == noise.shape and samples.dtype == noise.dtype
    assert_moments_match_the_data(samples, OBSERVED_BIAS["sd"][sampler])


@pytest.mark.parametrize("sampler", sorted(USUAL_STEPS))
def test_zero_terminal_snr_sampling_with_v_prediction_and_trailing_steps(sampler):
    """With zero terminal SNR the start N(0, I) is exactly the marginal at T - 1, so the mean is unbiased;
    v_prediction and trailing spacing (which starts at T - 1), as Lin et al. 2023 prescribe.
    Same sample count and tolerance rule as above."""
    noise = torch.randn(4000, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    denoise = gaussian_denoiser(ZERO_SNR_SCHEDULE.alphas_cumprod, "v_prediction", MU, STD)
    samples = sample(sampler, denoise, noise, ZERO_SNR_SCHEDULE.alphas_cumprod, USUAL_STEPS[sampler],
                     prediction_type="v_prediction", timestep_spacing="trailing",
                     generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(samples).all()
    assert_moments_match_the_data(samples, OBSERVED_BIAS["zero_snr"][sampler])


def test_epsilon_prediction_refuses_a_zero_snr_first_step():
    denoise = gaussian_denoiser(ZERO_SNR_SCHEDULE.alphas_cumprod, "epsilon", MU, STD)
    with pytest.raises(ValueError, match="zero terminal SNR.*v_prediction"):
        sample_ddim(denoise, torch.randn(2, 1, 1, 1), ZERO_SNR_SCHEDULE.alphas_cumprod, timestep_spacing="trailing")


# ------------------------------------------------------------ exact answers without sampling noise
# Deterministic samplers with this denoiser are affine maps of the initial noise z, so running them
# on z in {-1, 0, 1} gives their output distribution exactly.
Z = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).view(3, 1, 1, 1)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_equals_its_closed_form_for_gaussian_data(spacing):
    """For Gaussian data a DDIM step scales x_t - sqrt(a) mu by u.u' / |u|^2 with u = (sqrt(a) s, sqrt(1 - a)),
    so DDIM-n returns mu + (z - sqrt(a_first) mu) * prod(u_i.u_{i+1} / |u_i|^2), ending at a = 1. The product
    is (s / |u_first|) prod cos(angle between u_i and u_{i+1}): with narrow data (s = 0.3) and 50 steps the
    angles are large where SNR ~ 1/s^2 and the variance shrinks 15-22%. Exact to 1e-9 in float64."""
    mu, std = 0.5, 0.3
    alphas_cumprod = SD_SCHEDULE.alphas_cumprod
    denoise = gaussian_denoiser(alphas_cumprod, "epsilon", mu, std)
    result = sample_ddim(denoise, Z, alphas_cumprod, 50, timestep_spacing=spacing).flatten()
    levels = [alphas_cumprod[t].item() for t in make_timesteps(50, 1000, spacing).tolist()] + [1.0]
    factor = 1.0
    for a, a_next in zip(levels[:-1], levels[1:]):
        factor *= (math.sqrt(a * a_next) * std**2 + math.sqrt((1 - a) * (1 - a_next))) / (a * std**2 + 1 - a)
    expected = mu + (Z.flatten() - math.sqrt(levels[0]) * mu) * factor
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-9)
    assert 0.75 < (factor / std) ** 2 < 0.90  # the variance shrink the docstring explains


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_ode_samplers_converge_to_the_exact_flow(sampler):
    """The probability-flow ODE maps a start x (VP x_t at a_T, or Euler's x = sigma_max z) affinely onto the
    data: x0 = mu + (x_t - sqrt(a_T) mu) s / sqrt(a_T s^2 + 1 - a_T), i.e. mu + (x - mu) s / sqrt(s^2 + sigma^2)
    in sigma terms. The samplers' error to it must fall like 1 / steps (first order: the last step's
    posterior mean dominates even DPM-Solver++'s), and be below 0.007 at 400 steps (observed 0.004-0.0064)."""
    mu, std = 0.5, 0.3
    alphas_cumprod = SD_SCHEDULE.alphas_cumprod
    denoise = gaussian_denoiser(alphas_cumprod, "v_prediction", mu, std)
    kwargs = {"timestep_spacing": "trailing"} if sampler == "ddim" else {}  # all three start at t = T - 1
    a_last = alphas_cumprod[-1].item()
    if sampler == "euler":
        sigma_max = math.sqrt((1 - a_last) / a_last)
        exact = mu + (sigma_max * Z - mu) * std / math.sqrt(std**2 + sigma_max**2)
    else:
        exact = mu + (Z - math.sqrt(a_last) * mu) * std / math.sqrt(a_last * std**2 + 1 - a_last)
    errors = {}
    for steps in (50, 200, 400):
        result = sample(sampler, denoise, Z, alphas_cumprod, steps, prediction_type="v_prediction", **kwargs)
        errors[steps] = (result - exact).abs().max().item()
    assert errors[200] < errors[50] / 2.5 and errors[400] < errors[200] / 1.5, errors
    assert errors[400] < 0.007, errors


# ----------------------------------------------------------------------------------- determinism
def run(sampler, seed, **kwargs):
    noise = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    denoise = gaussian_denoiser(SD_SCHEDULE.alphas_cumprod, "epsilon", MU, STD)
    generator = torch.Generator().manual_seed(seed)
    return sample(sampler, denoise, noise, SD_SCHEDULE.alphas_cumprod, 20, generator=generator, **kwargs)


@pytest.mark.parametrize("sampler, kwargs", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("euler_ancestral", {})])
def test_stochastic_samplers_repeat_with_a_seed_and_differ_across_seeds(sampler, kwargs):
    assert torch.equal(run(sampler, 1, **kwargs), run(sampler, 1, **kwargs))
    assert (run(sampler, 1, **kwargs) - run(sampler, 2, **kwargs)).abs().max() > 0.01


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_deterministic_samplers_ignore_the_generator(sampler):
    assert torch.equal(run(sampler, 1), run(sampler, 2))


def test_sample_dispatch_names_what_is_valid():
    with pytest.raises(ValueError, match="ddim.*dpmpp_2m.*euler"):
        run("plms", 0)
    with pytest.raises(ValueError, match="does not take \\['eta'\\]"):
        run("euler", 0, eta=0.5)
    with pytest.raises(ValueError, match="timestep_spacing='even'"):
        run("ddim", 0, timestep_spacing="even")
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        make_timesteps(0, 1000)
    with pytest.raises(ValueError, match="steps_offset=1"):
        make_timesteps(1000, 1000, "leading", steps_offset=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler", sorted(USUAL_STEPS))
def test_samplers_run_on_cuda_with_a_cpu_schedule(sampler):
    """Noise and generator on the GPU, alphas_cumprod left on the CPU; deterministic samplers agree with the CPU."""
    alphas_cumprod = SD_SCHEDULE.alphas_cumprod
    noise = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    denoise = gaussian_denoiser(alphas_cumprod, "epsilon", MU, STD)

    def denoise_cuda(x, t):
        assert x.is_cuda and t.is_cuda
        return denoise(x.cpu(), t.cpu()).to(x.device)

    result = sample(sampler, denoise_cuda, noise.cuda(), alphas_cumprod, 20,
                    generator=torch.Generator("cuda").manual_seed(1))
    assert result.is_cuda and torch.isfinite(result).all()
    if sampler in ("ddim", "euler", "dpmpp_2m"):
        expected = sample(sampler, denoise, noise, alphas_cumprod, 20)
        torch.testing.assert_close(result.cpu(), expected, rtol=1e-5, atol=1e-5)
