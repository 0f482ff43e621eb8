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
    demo_step = sections["train_step_256"]["demo_step"]
    assert set(demo_step["seconds_per_step"]) == {"ldm demo now", "ldm demo before", "diffusers fp32", "diffusers bf16"}


def test_the_demo_step_benchmark_runs_in_the_environment_make_demo_exports(tmp_path):
    """The "now" arm reads `make demo`'s exports from the Makefile, so it times what the demo runs."""
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.train_step import make_demo_environment

    makefile = tmp_path / "Makefile"
    makefile.write_text("test: export OMP_WAIT_POLICY ?= PASSIVE\ndemo: export A_B ?= x=1:y=2\ndemo: $(STAMP)\n")
    assert make_demo_environment(makefile) == {"A_B": "x=1:y=2"}
    assert "glibc.malloc.mmap_threshold=" in make_demo_environment()["GLIBC_TUNABLES"]
