"""eval.py end to end on a tiny random checkpoint: results JSON, grids, sweep plot; 2 processes give what 1 gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ldm.config import instantiate_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as train.py writes it (state dict + model config) of an untrained tiny model."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "model.vae_weights=null", "model.latent_scale_factor=0.5"])
    torch.manual_seed(0)
    module = instantiate_module(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "ldm_model_config": module.model_config}, path)
    return path


def run_eval(root: Path, checkpoint: Path, name: str, *overrides: str, logger: str = "csv") -> dict:
    command = [
        sys.executable, str(ROOT / "eval.py"), f"ckpt_path={checkpoint}", f"paths.root_dir={root}",
        f"hydra.run.dir={root / name}", f"logger={logger}", "eval/feature_extractor@feature_extractor=pooled_pixels",
        "data.synthetic.num_train=256", "data.synthetic.num_val=40", "data.synthetic.samples_per_shard=128",
        "eval.num_samples=10", "eval.num_inference_steps=3", "eval.batch_size=4", "eval.kid_subsets=5",
        "eval.num_grid_images=4", *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((root / name / "results.json").read_text())


@pytest.mark.slow
def test_eval_job_writes_results_and_two_processes_match_one(tiny_checkpoint, tmp_path):
    one = run_eval(tmp_path, tiny_checkpoint, "one", "eval.guidance_scales=[1,3]", logger="wandb")
    two = run_eval(tmp_path, tiny_checkpoint, "two", "eval.guidance_scales=[1,3]", "fabric.devices=2")
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["num_samples"] == 10 and one["reference"]["num_images"] == 40
    assert one["feature_extractor"]["name"] == "pooled_pixels_4x4"
    assert one["sampler"] == "ddim" and one["num_inference_steps"] == 3 and one["guidance_scales"] == [1.0, 3.0]
    assert one["checkpoint"] == str(tiny_checkpoint)
    # The reference features were cached by the first run and read by the second.
    assert one["reference"]["feature_cache"] == two["reference"]["feature_cache"]
    for row_one, row_two in zip(one["rows"], two["rows"], strict=True):
        for metric in ("fid", "kid_mean", "kid_std", "clip_score", "adherence_all"):
            assert row_two[metric] == pytest.approx(row_one[metric], rel=1e-4, abs=1e-5), metric
    (wandb_run,) = (tmp_path / "one" / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("files/media/table/eval/*.table.json"))  # the sweep table
    assert list(wandb_run.glob("files/media/images/eval/**/*.png"))  # grids and the plot
    for name in ("one", "two"):
        assert (tmp_path / name / "fid_vs_clip_score.png").is_file()
        assert (tmp_path / name / "samples_guidance_3.png").is_file()


def test_generation_captions_repeat_the_reference_or_prompt_file_and_refuse_bad_input(tmp_path):
    from ldm.evaluation.job import generation_captions

    assert generation_captions(["a", "b"], 5, None) == ["a", "b", "a", "b", "a"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\n\n second \n")
    assert generation_captions(["a"], 3, str(prompts)) == ["first", "second", "first"]
    with pytest.raises(FileNotFoundError, match="eval.prompts_file=.*does not exist"):
        generation_captions(["a"], 3, str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="eval.num_samples=0"):
        generation_captions(["a"], 0, None)
