"""`make gpu-check DRY_RUN=1` runs every section of the GPU check on the CPU at tiny sizes, so it cannot rot
before a GPU is lent."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_section(tmp_path):
    output = tmp_path / "gpu_check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    result = subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1", f"GPU_CHECK_ARGS=--output={output}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads(output.read_text())
    failed = {name: section.get("error") for name, section in report["sections"].items() if section["status"] != "ok"}
    assert result.returncode == 0 and not failed, (failed, result.stdout[-3000:])
    sections = report["sections"]
    assert list(sections) == ["cuda_tests", "train_step_256", "unet_memory", "pipeline_512", "training_run"]
    assert sections["cuda_tests"]["tests"], "no CUDA-only test was found"
    (row,) = sections["train_step_256"]["rows"]
    assert row["images_per_s"]["ldm"] > 0 and row["images_per_s"]["diffusers"] > 0
    assert all(mib > 0 for mib in sections["unet_memory"]["peak_step_memory_mib"].values())
    # Same model, latents and sampler in fp32: the two pipelines' images agree as in test_sampling_benchmark.
    assert sections["pipeline_512"]["max_abs_pixel_difference"] < 1e-4
    losses = sections["training_run"]["losses"]
    assert len(losses) == sections["training_run"]["steps"] and all(math.isfinite(loss) for loss in losses)
