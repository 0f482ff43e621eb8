"""ldm's samplers step for step against diffusers' schedulers (used only here, as the reference).

Both sides are driven by the same fake model, a fixed linear function of x and t with random
coefficients, from the same noise; stochastic samplers get generators seeded alike (ldm draws its
step noise with torch.randn in the order diffusers' ``step`` does). Every intermediate sample must
agree to 1e-5 relative to the sample's scale: max |ours - theirs| <= 1e-5 * max(1, max |theirs|)
(Euler-type samples start at sigma_max ~ 15). The schedulers use their constructor defaults except
``clip_sample=False`` for DDPM/DDIM, which ldm deliberately never does (latents are not in [-1, 1]).
"""

import numpy as np
import pytest
import torch

from ldm.diffusion.samplers import (
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
)
from ldm.diffusion.timesteps import dpm_solver_timesteps_and_sigmas, euler_timesteps_and_sigmas, make_timesteps

from .conftest import initial_noise, linear_fake_model

diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 calls np.array on torch tensors, which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
# n for which diffusers' trailing spacing (float np.arange) returns n + 1 timesteps, the last -1.
TRAILING_EXTRA_STEP = {n for n in range(1, 1001) if len(np.arange(1000, 0, -1000 / n)) != n}

fake_model = linear_fake_model(1234)


def run_diffusers(scheduler, noise, num_inference_steps, seed=None, **step_kwargs):
    """The diffusers pipeline loop; returns every step's prev_sample."""
    scheduler.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x = noise * scheduler.init_noise_sigma
    samples = []
    for t in scheduler.timesteps:
        output = fake_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(output, t, x, generator=generator, **step_kwargs).prev_sample
        samples.append(x)
    return samples


def run_ldm(sampler, noise, alphas_cumprod, num_inference_steps, seed=None, **kwargs):
    """An ldm sampler; returns every step's sample (the callback's x) and checks the return value is the last."""
    samples = []
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    result = sampler(
        fake_model, noise, alphas_cumprod, num_inference_steps, generator=generator,
        callback=lambda i, x, x0: samples.append(x), **kwargs,
    )
    assert torch.equal(result, samples[-1])
    return samples


def assert_same_trajectory(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (mine, reference) in enumerate(zip(ours, theirs)):
        scale = max(1.0, reference.abs().max().item())
        error = (mine - reference).abs().max().item()
        assert error <= 1e-5 * scale, f"step {step}: max difference {error:.2e} at scale {scale:.1f}"


# ------------------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("spacing", SPACINGS)
def test_integer_timesteps_equal_diffusers_for_every_step_count(spacing):
    """make_timesteps == DDIMScheduler.timesteps for n = 1..1000 (leading with SD's steps_offset=1); for
    trailing, where diffusers adds a stray -1 (62 values of n), ldm returns the n valid ones; for leading
    n = 1000 with offset 1, where diffusers returns timestep 1000 (out of the schedule), ldm refuses."""
    scheduler = diffusers.DDIMScheduler(**SCHEDULE, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    for n in range(1, 1001):
        scheduler.set_timesteps(n)
        theirs = scheduler.timesteps
        if spacing == "leading" and n == 1000:
            assert theirs[0] == 1000
            with pytest.raises(ValueError, match="steps_offset=1"):
                make_timesteps(n, 1000, spacing, steps_offset=1)
            continue
        ours = make_timesteps(n, 1000, spacing, steps_offset=scheduler.config.steps_offset)
        if spacing == "trailing" and n in TRAILING_EXTRA_STEP:
            assert theirs[-1] == -1
            theirs = theirs[:-1]
        assert torch.equal(ours, theirs), n


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_and_dpm_solver_timesteps_and_sigmas_equal_diffusers(spacing, karras):
    alphas_cumprod = diffusers.DDPMScheduler(**SCHEDULE).alphas_cumprod
    euler = diffusers.EulerDiscreteScheduler(**SCHEDULE, timestep_spacing=spacing, use_karras_sigmas=karras)
    dpm = diffusers.DPMSolverMultistepScheduler(**SCHEDULE, timestep_spacing=spacing, use_karras_sigmas=karras)
    for n in (1, 7, 20, 50, 100, 999):
        euler.set_timesteps(n)
        timesteps, sigmas = euler_timesteps_and_sigmas(alphas_cumprod, n, spacing, karras)
        torch.testing.assert_close(timesteps.float(), euler.timesteps, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(sigmas.float(), euler.sigmas, rtol=1e-5, atol=0)
        if n == 999 and spacing != "trailing":
            continue  # DPM-Solver's linspace/leading need n + 1 <= T points
        dpm.set_timesteps(n)
        timesteps, sigmas = dpm_solver_timesteps_and_sigmas(alphas_cumprod, n, spacing, karras)
        assert torch.equal(timesteps, dpm.timesteps)
        torch.testing.assert_close(sigmas.float(), dpm.sigmas, rtol=1e-5, atol=0)


# -------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_equals_diffusers(prediction_type, spacing):
    scheduler = diffusers.DDPMScheduler(**SCHEDULE, prediction_type=prediction_type, timestep_spacing=spacing,
                                        clip_sample=False)
    noise = initial_noise()
    theirs = run_diffusers(scheduler, noise, 100, seed=7)
    ours = run_ldm(sample_ddpm, noise, scheduler.alphas_cumprod, 100, seed=7, prediction_type=prediction_type,
                   timestep_spacing=spacing)
    assert_same_trajectory(ours, theirs)


def test_ddpm_over_the_full_chain_equals_diffusers():
    """In float64 on both sides: near t = 0 diffusers' float32 1 - a_t / a_prev loses ~1e-4 relative."""
    scheduler = diffusers.DDPMScheduler(**SCHEDULE, clip_sample=False)
    scheduler.alphas_cumprod, scheduler.one = scheduler.alphas_cumprod.double(), scheduler.one.double()
    noise = initial_noise().double()
    assert_same_trajectory(run_ldm(sample_ddpm, noise, scheduler.alphas_cumprod, 1000, seed=3),
                           run_diffusers(scheduler, noise, 1000, seed=3))


@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_equals_diffusers(prediction_type, spacing, eta):
    """For "linspace" diffusers' DDIM steps to t - T//n instead of the next timestep; see the next test."""
    scheduler = diffusers.DDIMScheduler(**SCHEDULE, prediction_type=prediction_type, timestep_spacing=spacing,
                                        clip_sample=False)
    noise = initial_noise()
    theirs = run_diffusers(scheduler, noise, 50, seed=7, eta=eta)
    ours = run_ldm(sample_ddim, noise, scheduler.alphas_cumprod, 50, seed=7, prediction_type=prediction_type,
                   timestep_spacing=spacing, eta=eta)
    assert_same_trajectory(ours, theirs)


def test_ddim_with_stable_diffusion_config_equals_diffusers():
    """SD 1.x's scheduler config: leading spacing with steps_offset=1, set_alpha_to_one=False.
    ldm always ends at alpha 1 (returns the x0 estimate); diffusers' last step then goes to a_0
    instead, so the trajectories agree up to that last step."""
    scheduler = diffusers.DDIMScheduler(**SCHEDULE, clip_sample=False, steps_offset=1, set_alpha_to_one=False)
    noise = initial_noise()
    theirs = run_diffusers(scheduler, noise, 50)
    ours = run_ldm(sample_ddim, noise, scheduler.alphas_cumprod, 50, steps_offset=1)
    assert_same_trajectory(ours[:-1], theirs[:-1])
    one = diffusers.DDIMScheduler(**SCHEDULE, clip_sample=False, steps_offset=1)
    assert_same_trajectory(ours, run_diffusers(one, noise, 50))


@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_with_eta_one_is_ddpm(spacing):
    """eta = 1 gives the DDPM posterior; this also checks ldm's DDIM with linspace spacing through
    diffusers-equal DDPM, as diffusers' own DDIM differs there."""
    noise = initial_noise()
    alphas_cumprod = diffusers.DDPMScheduler(**SCHEDULE).alphas_cumprod
    ddim = run_ldm(sample_ddim, noise, alphas_cumprod, 50, seed=5, eta=1.0, timestep_spacing=spacing)
    ddpm = run_ldm(sample_ddpm, noise, alphas_cumprod, 50, seed=5, timestep_spacing=spacing)
    assert_same_trajectory(ddim, ddpm)


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_euler_equals_diffusers(prediction_type, spacing, karras):
    scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULE, prediction_type=prediction_type,
                                                 timestep_spacing=spacing, use_karras_sigmas=karras)
    noise = initial_noise()
    theirs = run_diffusers(scheduler, noise, 50)
    ours = run_ldm(sample_euler, noise, scheduler.alphas_cumprod, 50, prediction_type=prediction_type,
                   timestep_spacing=spacing, karras_sigmas=karras)
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])  # diffusers has no "sample" here
def test_euler_ancestral_equals_diffusers(prediction_type, spacing):
    scheduler = diffusers.EulerAncestralDiscreteScheduler(**SCHEDULE, prediction_type=prediction_type,
                                                          timestep_spacing=spacing)
    noise = initial_noise()
    theirs = run_diffusers(scheduler, noise, 50, seed=11)
    ours = run_ldm(sample_euler_ancestral, noise, scheduler.alphas_cumprod, 50, seed=11,
                   prediction_type=prediction_type, timestep_spacing=spacing)
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_dpmpp_2m_equals_diffusers(prediction_type, spacing, karras):
    scheduler = diffusers.DPMSolverMultistepScheduler(**SCHEDULE, prediction_type=prediction_type,
                                                      algorithm_type="dpmsolver++", solver_order=2,
                                                      timestep_spacing=spacing, use_karras_sigmas=karras)
    noise = initial_noise()
    theirs = run_diffusers(scheduler, noise, 20)
    ours = run_ldm(sample_dpmpp_2m, noise, scheduler.alphas_cumprod, 20, prediction_type=prediction_type,
                   timestep_spacing=spacing, karras_sigmas=karras)
    assert_same_trajectory(ours, theirs)


ZERO_SNR_CASES = {
    "ddim": (sample_ddim, diffusers.DDIMScheduler, dict(clip_sample=False), None),
    "euler": (sample_euler, diffusers.EulerDiscreteScheduler, {}, None),
    "euler_ancestral": (sample_euler_ancestral, diffusers.EulerAncestralDiscreteScheduler, {}, 13),
    "dpmpp_2m": (sample_dpmpp_2m, diffusers.DPMSolverMultistepScheduler, {}, None),
}


@pytest.mark.parametrize("name", sorted(ZERO_SNR_CASES))
def test_zero_terminal_snr_v_prediction_trailing_equals_diffusers(name):
    """ldm gets the schedule with alphas_cumprod[-1] == 0 and must itself make Euler-type sigmas finite
    as diffusers does (a = 2^-24)."""
    sampler, scheduler_class, options, seed = ZERO_SNR_CASES[name]
    scheduler = scheduler_class(**SCHEDULE, prediction_type="v_prediction", timestep_spacing="trailing",
                                rescale_betas_zero_snr=True, **options)
    alphas_cumprod = diffusers.DDPMScheduler(**SCHEDULE, rescale_betas_zero_snr=True).alphas_cumprod
    assert alphas_cumprod[-1] == 0
    noise = initial_noise()
    theirs = run_diffusers(scheduler, noise, 25, seed=seed)
    ours = run_ldm(sampler, noise, alphas_cumprod, 25, seed=seed, prediction_type="v_prediction",
                   timestep_spacing="trailing")
    assert_same_trajectory(ours, theirs)
