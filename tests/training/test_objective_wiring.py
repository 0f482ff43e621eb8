"""The objective chosen by config (model/objective=flow|edm, model.loss.*) reaches training, sampling,
checkpoints and export; settings of another objective stop at start-up with the key named."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException

from ldm.config_check import ConfigError, check_config
from ldm.diffusion.flow_matching import flow_sampling_times
from ldm.interchange.diffusers_configs import scheduler_config
from ldm.training.sample_grid import SampleGridLogger
from tests.training.test_diffusion_module import tiny_config, tiny_module, train_steps



def loss_of(module, seed=0):
    latents = torch.randn(4, module.network.in_channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    context = module.conditioning(["a red circle on a white background"] * 4)
    return module.diffusion_loss(latents, context, generator=torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("overrides, prediction_type", [
    ((), "epsilon"),
    (("model/objective=flow", "model.objective.shift=3.0"), "flow"),
    (("model/objective=edm",), "edm"),
    (("model/objective=flow", "model.loss.loss_type=pseudo_huber", "model.loss.huber_schedule=snr",
      "model.loss.input_perturbation=0.1", "model.loss.debiased=true", "model.loss.timestep_bias_range=[0.5,1.0]",
      "model.loss.timestep_bias_probability=0.5"), "flow"),
])
def test_objective_trains_samples_and_records_itself(overrides, prediction_type):
    """Two training steps move the U-Net; the loss is finite and repeatable with a generator; the pipeline
    samples with the objective's default sampler and settings. (The demo recipe's min-SNR weighting belongs to
    its discrete objective, which model/objective=flow|edm replaces whole.)"""
    module = tiny_module(*overrides)
    assert module.objective.prediction_type == prediction_type
    first, again = loss_of(module), loss_of(module)
    assert torch.isfinite(first) and torch.equal(first, again)
    before = [p.detach().clone() for p in module.network.parameters()]
    train_steps(module, steps=2)
    assert any(not torch.equal(a, p) for a, p in zip(before, module.network.parameters()))
    pipeline = module.pipeline(use_ema=False)
    if prediction_type == "flow":
        assert pipeline.sampler_options == {"shift": 3.0 if "model.objective.shift=3.0" in overrides else 1.0}
    images = pipeline(["a red circle on a white background"], height=32, width=32, num_inference_steps=3)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_discrete_loss_is_unchanged_by_the_objective_wiring():
    """With the default objective the loss equals the weighted MSE computed by hand from the same draws."""
    from ldm.diffusion.objectives import q_sample, training_target

    module = tiny_module("model.objective.loss_weighting=uniform")
    latents = torch.randn(4, module.network.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    context = module.conditioning(["a red circle on a white background"] * 4)
    generator = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (4,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    with torch.no_grad():
        prediction = module.network(q_sample(latents, t, noise, module.alphas_cumprod), t, context)
        expected = (prediction - training_target("epsilon", latents, noise, t, module.alphas_cumprod)).pow(2).mean()
        got = module.diffusion_loss(latents, context, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, expected)


def test_misconfiguration_stops_at_start_up_with_the_key():
    with pytest.raises(InstantiationException, match="model.noise_schedule.zero_terminal_snr"):
        tiny_module("model/objective=edm", "model.noise_schedule.zero_terminal_snr=true")
    # Settings of discrete diffusion given to another objective: train.py's start-up check names the key.
    with pytest.raises(ConfigError, match="model.objective.prediction_type"):
        check_config(tiny_config("model/objective=flow", "+model.objective.prediction_type=v_prediction").model, "model")
    with pytest.raises(ConfigError, match="model.objective.loss_weighting"):
        check_config(tiny_config("model/objective=flow", "+model.objective.loss_weighting=min_snr").model, "model")
    with pytest.raises(InstantiationException, match="unexpected keyword argument 'shift'"):  # shift without flow
        tiny_module("model/objective=edm", "+model.objective.shift=3.0")
    with pytest.raises(InstantiationException, match="model.loss.debiased=true.*model.objective.loss_weighting=min_snr"):
        tiny_module("model.loss.debiased=true", "model.objective.loss_weighting=min_snr")
    module = tiny_module("model/objective=flow")
    logger = SampleGridLogger(prompts=["a"], output_dir="unused", height=32, width=32, sampler="ddim")
    with pytest.raises(ValueError, match="callbacks.sample_grid.sampler='ddim' does not fit.*'flow'"):
        logger.setup(None, module, "fit")
    with pytest.raises(ValueError, match="shift=3.0 is the time shift of flow matching"):
        tiny_module().pipeline()(["a"], height=32, width=32, num_inference_steps=2, shift=3.0)


def test_export_scheduler_configs_load_in_diffusers_and_match_ldm():
    diffusers = pytest.importorskip("diffusers")
    flow = tiny_module("model/objective=flow", "model.objective.shift=3.0")
    config = scheduler_config(flow.noise_schedule, flow.objective.prediction_type, flow.objective.sampler_options())
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(20)
    torch.testing.assert_close(scheduler.sigmas, flow_sampling_times(20, 3.0).float(), rtol=1e-6, atol=1e-7)
    edm = tiny_module("model/objective=edm")
    config = scheduler_config(edm.noise_schedule, edm.objective.prediction_type, edm.objective.sampler_options())
    scheduler = diffusers.EDMEulerScheduler.from_config(config)
    assert scheduler.config.sigma_data == 1.0 and scheduler.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="sigma_data"):
        scheduler_config(edm.noise_schedule, "edm", {})


def test_a_flow_checkpoint_loads_with_its_objective(tmp_path):
    """from_pretrained over a training checkpoint of a flow run samples as flow matching, with its shift."""
    from ldm.pipeline import TextToImagePipeline

    module = tiny_module("model/objective=flow", "model.objective.shift=2.0")
    trainer = train_steps(module, steps=1)
    path = tmp_path / "flow.ckpt"
    trainer.save_checkpoint(path)
    pipeline = TextToImagePipeline.from_pretrained(path)
    assert pipeline.prediction_type == "flow" and pipeline.sampler_options == {"shift": 2.0}
    with pytest.raises(ValueError, match="sampler='ddim' does not fit"):
        pipeline(["a"], height=32, width=32, num_inference_steps=2, sampler="ddim")


@pytest.mark.parametrize("objective, options", [
    ("flow", {"shift": 2.0}),
    ("edm", {"sigma_data": 1.0, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}),
])
@pytest.mark.parametrize("format", ["diffusers", "sd"])
def test_exported_flow_and_edm_models_load_back_with_their_objective(tmp_path, objective, options, format):
    """A diffusers folder records the objective in its scheduler (FlowMatchEulerDiscreteScheduler /
    EDMEulerScheduler), an SD file in its metadata; from_pretrained reads it back, so the reloaded model
    samples as the original does."""
    from ldm.pipeline import TextToImagePipeline
    from ldm.interchange.export import export_pipeline

    overrides = [f"model/objective={objective}"]
    module = tiny_module(*overrides, *(["model.objective.shift=2.0"] if objective == "flow" else []))
    pipeline = module.pipeline(use_ema=False)
    out = export_pipeline(pipeline, tmp_path / ("model" if format == "diffusers" else "model.safetensors"), format)
    loaded = TextToImagePipeline.from_pretrained(out)
    assert loaded.prediction_type == objective and loaded.sampler_options == options
    kwargs = dict(height=32, width=32, num_inference_steps=2, seed=3)
    torch.testing.assert_close(loaded(["a"], **kwargs), pipeline(["a"], **kwargs), rtol=0, atol=1e-5)
