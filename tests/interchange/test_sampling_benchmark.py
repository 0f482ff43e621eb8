"""benchmarks/sampling.py runs ldm's and diffusers' pipelines on one exported model and they make the same images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim"])
def test_sampling_benchmark_times_the_same_images(trained_run, tmp_path, sampler):
    """Both pipelines get the same scheduler settings and latents; their fp32 images agree to 1e-4 (the
    tolerance of test_model_folder_is_a_stable_diffusion_pipeline: the same math in another op order)."""
    pytest.importorskip("diffusers")
    output = tmp_path / "sampling.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/sampling.py", "--model", str(trained_run.parents[1] / "model"),
         "--sampler", sampler, "--steps", "3", "--batch", "2", "--repeats", "1", "--warmup", "0",
         "--device", "cpu", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["max_abs_pixel_difference"] < 1e-4
    assert report["ldm_sampler_options"] == {"timestep_spacing": "leading", "steps_offset": 1}
    assert report["diffusers_scheduler"] == {"dpmpp_2m": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}[sampler]
    assert report["ratio_ldm_over_diffusers"] > 0
