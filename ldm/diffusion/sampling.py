"""One entry to every sampler: ``sample`` runs the sampler a name picks for a model's objective, and
``check_sampler`` refuses a sampler of another objective before any sampling.

The discrete-schedule samplers (``samplers.py``) take the schedule's ``alphas_cumprod``; the flow-matching
(``flow_matching.py``) and EDM (``edm.py``) samplers are wrapped here into that calling convention
(``denoise, noise, alphas_cumprod, num_inference_steps, prediction_type, **options``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.edm import sample_edm
from ldm.diffusion.flow_matching import sample_flow_euler, sample_flow_heun
from ldm.diffusion.objectives import PREDICTION_TYPES
from ldm.diffusion.samplers import (Denoiser, StepCallback, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler,
                                    sample_euler_ancestral, sample_heun)


def _flow_sampler(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A flow-matching sampler in the dispatch's calling convention (the schedule gives T only)."""

    def run(denoise: Denoiser, noise: Tensor, alphas_cumprod: Tensor, num_inference_steps: int = 50,
            prediction_type: str = "flow", shift: float = 1.0, generator: torch.Generator | None = None,
            callback: StepCallback | None = None) -> Tensor:
        return function(denoise, noise, num_inference_steps, shift, len(alphas_cumprod), callback)

    run.__doc__ = function.__doc__
    return run


def _edm_sampler(second_order: bool) -> Callable[..., Tensor]:
    """An EDM sampler in the dispatch's calling convention (the discrete schedule is unused)."""

    def run(denoise: Denoiser, noise: Tensor, alphas_cumprod: Tensor, num_inference_steps: int = 18,
            prediction_type: str = "edm", sigma_data: float = 1.0, sigma_min: float = 0.002, sigma_max: float = 80.0,
            rho: float = 7.0, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
            s_noise: float = 1.0, generator: torch.Generator | None = None,
            callback: StepCallback | None = None) -> Tensor:
        return sample_edm(denoise, noise, num_inference_steps, sigma_data, sigma_min, sigma_max, rho, second_order,
                          s_churn, s_tmin, s_tmax, s_noise, generator, callback)

    run.__doc__ = sample_edm.__doc__
    return run


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "flow_euler": _flow_sampler(sample_flow_euler),
    "flow_heun": _flow_sampler(sample_flow_heun),
    "edm_heun": _edm_sampler(second_order=True),
    "edm_euler": _edm_sampler(second_order=False),
}
# Which samplers fit which objective (``prediction_type``): a model of one objective refuses the others'.
SAMPLERS_BY_OBJECTIVE: dict[str, tuple[str, ...]] = {
    **{kind: ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m") for kind in PREDICTION_TYPES},
    "flow": ("flow_euler", "flow_heun"),
    "edm": ("edm_heun", "edm_euler"),
}
DEFAULT_SAMPLERS = {**{kind: "ddim" for kind in PREDICTION_TYPES}, "flow": "flow_euler", "edm": "edm_heun"}


def check_sampler(sampler: str, prediction_type: str, key: str = "sampler") -> None:
    """Raise a ValueError naming ``key`` when ``sampler`` is unknown or belongs to another objective."""
    if prediction_type not in SAMPLERS_BY_OBJECTIVE:
        raise ValueError(f"prediction_type={prediction_type!r}; choose one of {sorted(SAMPLERS_BY_OBJECTIVE)}")
    if sampler not in SAMPLERS:
        raise ValueError(f"{key}={sampler!r}; choose one of {sorted(SAMPLERS)}")
    fitting = SAMPLERS_BY_OBJECTIVE[prediction_type]
    if sampler not in fitting:
        raise ValueError(f"{key}={sampler!r} does not fit this model's objective ({prediction_type!r}); "
                         f"choose one of {list(fitting)}")


def sample(
    sampler: str | None,
    denoise: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    num_inference_steps: int,
    prediction_type: str = "epsilon",
    **kwargs,
) -> Tensor:
    """Run the sampler named ``sampler`` (a key of SAMPLERS; None: the objective's default, DEFAULT_SAMPLERS)
    for a model of ``prediction_type`` (epsilon | v_prediction | sample | flow | edm); ``kwargs`` go to it
    (flow: ``shift``; EDM: ``sigma_data``, ``sigma_min``, ``sigma_max``, ``rho``, churn). Returns x0 (B, C, H, W).
    ``alphas_cumprod`` (T,) is the discrete schedule; flow samplers read only T from it, EDM none of it."""
    if sampler is None:
        sampler = DEFAULT_SAMPLERS.get(prediction_type, "ddim")
    check_sampler(sampler, prediction_type)
    function = SAMPLERS[sampler]
    accepted = inspect.signature(function).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if "shift" in unknown:
        raise ValueError(f"shift={kwargs['shift']} is the time shift of flow matching; this model's objective is "
                         f"{prediction_type!r}: remove shift")
    if unknown:
        options = [name for name in accepted if name not in ("denoise", "noise", "alphas_cumprod")]
        raise ValueError(f"sampler {sampler!r} does not take {unknown}; it takes {options}")
    return function(
        denoise, noise, alphas_cumprod, num_inference_steps=num_inference_steps, prediction_type=prediction_type, **kwargs
    )
