"""Loss options (Huber, pseudo-Huber, scheduled delta, input perturbation, debiased weighting, timestep bias)
and the training objectives that compute one step's inputs, targets and weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from ldm.diffusion.edm import edm_denoised
from ldm.diffusion.flow_matching import x0_and_noise_from_velocity
from ldm.diffusion.losses import LossOptions, debiased_weights, huber_delta, per_sample_loss, perturbed_noise
from ldm.diffusion.objectives import predict_x0_and_eps
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.timestep_sampling import sample_quantiles
from ldm.diffusion.training_objectives import EDM, DiscreteDiffusion, FlowMatching, check_objective_configuration

ALPHAS_CUMPROD = NoiseSchedule().alphas_cumprod


def test_huber_losses_are_mse_near_zero_and_linear_far_away():
    residual = torch.tensor([1e-3, 0.05, 0.5, 5.0]).view(4, 1)
    delta = torch.full((4,), 0.1)
    huber = per_sample_loss(residual, torch.zeros_like(residual), "huber", delta)
    torch.testing.assert_close(huber, 2 * F.huber_loss(residual, torch.zeros_like(residual), reduction="none",
                                                       delta=0.1).flatten())
    pseudo = per_sample_loss(residual, torch.zeros_like(residual), "pseudo_huber", delta)
    torch.testing.assert_close(pseudo[:1], residual[:1, 0] ** 2, rtol=1e-3, atol=0)  # r << delta: r^2
    torch.testing.assert_close(pseudo[-1:], 2 * 0.1 * residual[-1:, 0], rtol=0.03, atol=0)  # r >> delta: 2 delta |r|
    assert torch.equal(per_sample_loss(residual, torch.zeros_like(residual)), residual.flatten() ** 2)
    with pytest.raises(ValueError, match="loss_type='l1'"):
        per_sample_loss(residual, residual, "l1", delta)


def test_scheduled_huber_delta_runs_from_one_at_clean_to_delta_at_noise():
    snr = torch.tensor([1e12, 1.0, 1e-12])
    fraction = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(huber_delta("exponential", 0.1, snr, fraction), torch.tensor([1.0, 0.1**0.5, 0.1]))
    snr_schedule = huber_delta("snr", 0.1, snr, fraction)
    torch.testing.assert_close(snr_schedule[[0, 2]], torch.tensor([1.0, 0.1]), rtol=1e-5, atol=1e-5)
    assert snr_schedule[1] == pytest.approx(0.9 / 4 + 0.1)
    assert torch.equal(huber_delta("constant", 0.3, snr, fraction), torch.full((3,), 0.3))


def test_input_perturbation_changes_the_input_not_the_target():
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 64, 4, 8, 8, generator=generator)
    perturbed = perturbed_noise(noise, 0.1, torch.Generator().manual_seed(1))
    assert abs((perturbed - noise).std().item() - 0.1) < 0.005  # 16,384 draws: SE of the std is 0.1 / 181
    for objective in (DiscreteDiffusion(), FlowMatching(), EDM()):
        levels = objective.sample_levels(64, 1000, torch.Generator().manual_seed(2), "cpu", None, 0.0)
        clean = objective.noised_batch(x0, noise, noise, levels, ALPHAS_CUMPROD)
        shaken = objective.noised_batch(x0, noise, perturbed, levels, ALPHAS_CUMPROD)
        assert torch.equal(clean.target, shaken.target)
        assert not torch.allclose(clean.model_input, shaken.model_input)


@pytest.mark.parametrize("objective", [DiscreteDiffusion("epsilon"), DiscreteDiffusion("v_prediction"),
                                       DiscreteDiffusion("sample"), FlowMatching(), EDM(sigma_data=0.5)])
def test_each_objective_target_implies_x0_and_its_x0_error_scale(objective):
    """The exact target recovers x0 from the model input; an error e in the target moves x0 by e / sqrt(scale)."""
    generator = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 16, 4, 4, 4, generator=generator, dtype=torch.float64)
    levels = objective.sample_levels(16, 1000, generator, "cpu", None, 0.0)
    batch = objective.noised_batch(x0, noise, noise, levels, ALPHAS_CUMPROD.double())
    error = 1e-3 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)

    def implied_x0(output):
        if objective.family == "discrete":
            return predict_x0_and_eps(objective.prediction_type, output, batch.model_input, levels,
                                      ALPHAS_CUMPROD.double())[0]
        if objective.family == "flow":
            return x0_and_noise_from_velocity(output, batch.model_input, levels.double())[0]
        return edm_denoised(output, batch.model_input / batch.model_input.new_tensor(
            [1 / math.sqrt(s**2 + 0.25) for s in levels.tolist()]).view(-1, 1, 1, 1), levels.double(), 0.5)

    torch.testing.assert_close(implied_x0(batch.target), x0, rtol=0, atol=1e-4)
    moved = (implied_x0(batch.target + error) - x0).pow(2).mean(dim=(1, 2, 3))
    expected = error.pow(2).mean(dim=(1, 2, 3)) / batch.x0_error_scale.double()
    torch.testing.assert_close(moved, expected, rtol=1e-3, atol=1e-12)


def test_debiased_weights_are_one_over_sqrt_snr_on_epsilon():
    """Yu et al. 2024 weight the epsilon loss by 1 / sqrt(SNR); for x0 loss that is sqrt(SNR)."""
    snr = torch.tensor([0.01, 1.0, 100.0, 1e6])
    torch.testing.assert_close(debiased_weights(snr, snr), torch.tensor([10.0, 1.0, 0.1, 1e-3 * math.sqrt(1e3) / 1e3]))
    torch.testing.assert_close(debiased_weights(snr, torch.ones(4)), torch.tensor([0.1, 1.0, 10.0, math.sqrt(1e3)]))


def test_timestep_bias_draws_more_of_the_range():
    """With probability p of U(0.7, 1) the share of u in [0.7, 1] is (1 - p) 0.3 + p: 0.65 for p = 0.5
    (4 SE over 100,000 draws: 0.006)."""
    u = sample_quantiles(100_000, torch.Generator().manual_seed(5), bias_range=(0.7, 1.0), bias_probability=0.5)
    share = ((u >= 0.7).float().mean().item())
    assert abs(share - 0.65) < 4 * math.sqrt(0.65 * 0.35 / 1e5)
    unbiased = sample_quantiles(100_000, torch.Generator().manual_seed(5))
    assert abs((unbiased >= 0.7).float().mean().item() - 0.3) < 0.006
    with pytest.raises(ValueError, match="timestep_bias_range"):
        LossOptions(timestep_bias_range=(0.8, 0.2), timestep_bias_probability=0.5)


def test_flow_and_edm_levels_follow_their_distributions():
    flow = FlowMatching(timestep_sampling="logit_normal", shift=1.0)
    t = flow.sample_levels(100_000, 1000, torch.Generator().manual_seed(6), "cpu", None, 0.0)
    assert abs(torch.logit(t.double()).mean().item()) < 4 / math.sqrt(1e5)
    sigma = EDM().sample_levels(100_000, 1000, torch.Generator().manual_seed(7), "cpu", None, 0.0)
    assert abs(sigma.double().log().mean().item() + 1.2) < 4 * 1.2 / math.sqrt(1e5)
    discrete = DiscreteDiffusion().sample_levels(8, 1000, torch.Generator().manual_seed(8), "cpu", None, 0.0)
    assert torch.equal(discrete, torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(8)))


def test_misconfiguration_names_the_key():
    """(Discrete-diffusion settings given to flow or EDM are keys those objectives lack: train.py's start-up check
    names them, tests/training/test_objective_wiring.py.)"""
    with pytest.raises(ValueError, match="model.noise_schedule.zero_terminal_snr"):
        check_objective_configuration(EDM(), zero_terminal_snr=True)
    with pytest.raises(ValueError, match="model.objective.loss_weighting='minsnr'"):
        DiscreteDiffusion(loss_weighting="minsnr")
    with pytest.raises(ValueError, match="model.objective.snr_gamma=0"):
        DiscreteDiffusion(loss_weighting="min_snr", snr_gamma=0)
    with pytest.raises(ValueError, match="model.objective.timestep_sampling='beta'"):
        FlowMatching(timestep_sampling="beta")
    with pytest.raises(ValueError, match="model.loss.loss_type='l1'"):
        LossOptions(loss_type="l1")
    check_objective_configuration(DiscreteDiffusion("v_prediction", "min_snr"), True)
