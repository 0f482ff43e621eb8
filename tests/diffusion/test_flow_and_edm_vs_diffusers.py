"""Flow-matching, Heun and EDM samplers step for step against diffusers' schedulers (the reference, used only here).

Same rules as test_samplers_vs_diffusers.py: one fixed linear fake model on both sides, the same initial
noise (diffusers' init_noise_sigma applied on its side, ldm's own start on ours), and every intermediate
sample within 1e-5 of the sample's scale. Heun schedulers count a predictor and a corrector as two
``step`` calls; ldm's callback reports one full step, so diffusers' samples are taken after each corrector.
"""

import pytest
import torch

from ldm.diffusion.edm import sample_edm
from ldm.diffusion.flow_matching import flow_sampling_times, sample_flow_euler, sample_flow_heun
from ldm.diffusion.samplers import sample_heun

from .conftest import initial_noise, linear_fake_model

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
fake_model = linear_fake_model(4321)


def run_diffusers(scheduler, noise, num_inference_steps, seed=None, every=1, init_sigma=None, **step_kwargs):
    scheduler.set_timesteps(num_inference_steps)
    if seed is not None:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    x = noise * (init_sigma if init_sigma is not None else getattr(scheduler, "init_noise_sigma", 1.0))
    samples = []
    for index, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(fake_model(model_input, t), t, x, **step_kwargs).prev_sample
        if index % every == 0:
            samples.append(x)
    return samples


def collect(run):
    samples = []
    result = run(lambda i, x, x0: samples.append(x))
    assert torch.equal(result, samples[-1])
    return samples


def assert_same_trajectory(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (mine, reference) in enumerate(zip(ours, theirs)):
        scale = max(1.0, reference.abs().max().item())
        error = (mine - reference).abs().max().item()
        assert error <= 1e-5 * scale, f"step {step}: max difference {error:.2e} at scale {scale:.1f}"


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 7, 28, 50])
def test_flow_euler_equals_flow_match_euler_discrete(steps, shift):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    noise = initial_noise()
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(flow_sampling_times(steps, shift).float(), scheduler.sigmas, rtol=1e-6, atol=1e-7)
    theirs = run_diffusers(scheduler, noise, steps)
    ours = collect(lambda callback: sample_flow_euler(fake_model, noise, steps, shift, callback=callback))
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_heun_equals_flow_match_heun_discrete(shift):
    """diffusers' last step (to sigma 0) is a lone predictor, as ldm's; its samples are kept after each
    corrector (odd step indices) and after the last step."""
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    noise = initial_noise()
    steps = 18
    scheduler.set_timesteps(steps)
    theirs_all = run_diffusers(scheduler, noise, steps)
    theirs = theirs_all[1::2][: steps - 1] + theirs_all[-1:]
    assert len(theirs_all) == 2 * steps - 1
    ours = collect(lambda callback: sample_flow_heun(fake_model, noise, steps, shift, callback=callback))
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_heun_equals_heun_discrete_scheduler(prediction_type, spacing, karras):
    scheduler = diffusers.HeunDiscreteScheduler(**SCHEDULE, prediction_type=prediction_type,
                                                timestep_spacing=spacing, use_karras_sigmas=karras)
    noise = initial_noise()
    steps = 18
    theirs_all = run_diffusers(scheduler, noise, steps)
    theirs = theirs_all[1::2][: steps - 1] + theirs_all[-1:]
    ours = collect(lambda callback: sample_heun(fake_model, noise, scheduler.alphas_cumprod, steps,
                                                prediction_type=prediction_type, timestep_spacing=spacing,
                                                karras_sigmas=karras, callback=callback))
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("steps", [5, 18, 40])
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_euler_equals_edm_euler_scheduler(sigma_data, steps):
    """diffusers' EDMEulerScheduler with prediction_type="epsilon" is EDM's F parametrisation. Its start is
    sqrt(sigma_max^2 + 1) z (init_noise_sigma) where EDM's is sigma_max z, so both are given x = sigma_max z.
    Without churn only: with it diffusers calls the model on x at sigma and adds the churn noise after,
    while Algorithm 2 adds it first and calls the model at sigma_hat (a different method, not a rounding)."""
    scheduler = diffusers.EDMEulerScheduler(sigma_data=sigma_data)
    noise = initial_noise()
    theirs = run_diffusers(scheduler, noise, steps, init_sigma=80.0)
    ours = collect(lambda callback: sample_edm(fake_model, noise, steps, sigma_data=sigma_data, second_order=False,
                                               callback=callback))
    assert_same_trajectory(ours, theirs)
