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
        cfg = compose("train", overrides=["experiment=demo", "model.latents.vae_weights=null", "model.latents.scale_factor=0.5"])
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


@pytest.mark.whole_machine
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
        for metric in ("fid", "kid_mean", "kid_std", "clip_score", "adherence_all", "precision", "recall", "density",
                       "coverage", "memorization_share_flagged"):
            assert row_two[metric] == pytest.approx(row_one[metric], rel=1e-4, abs=1e-5), metric
        for metric in ("fid", "clip_score"):  # the bootstrap is seeded and sees the samples in the same order
            for end in ("low", "high"):
                assert row_two["intervals"][metric][end] == pytest.approx(row_one["intervals"][metric][end], rel=1e-4)
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


def write_snapshots(checkpoint: Path, folder: Path) -> None:
    """Post-hoc EMA snapshots of the checkpoint's EMA U-Net: two profiles at steps 100 and 200, perturbed."""
    from ema_pytorch.post_hoc_ema import sigma_rel_to_gamma

    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    unet = {k[len("ema_network.module."):]: v for k, v in state.items() if k.startswith("ema_network.module.")}
    folder.mkdir(parents=True)
    (folder / "posthoc_ema.json").write_text(json.dumps({"gammas": [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.1)]}))
    generator = torch.Generator().manual_seed(0)
    for profile in (0, 1):
        for step in (100, 200):
            torch.save({f"ema_model.{k}": v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point()
                        else v for k, v in unet.items()}, folder / f"{profile}.{step}.pt")


@pytest.mark.slow
def test_eval_job_reports_intervals_manifold_memorization_seeds_comparison_and_sigma_rel_sweep(tiny_checkpoint,
                                                                                                   tmp_path):
    write_snapshots(tiny_checkpoint, tmp_path / "snapshots")
    results = run_eval(tmp_path, tiny_checkpoint, "trust", "eval.seeds=[5,6]", f"compare={tiny_checkpoint}",
                       "eval.bootstrap_resamples=20", "eval.prdc_k=3", "eval.memorization_grid_pairs=4",
                       f"eval.posthoc_ema_snapshots={tmp_path / 'snapshots'}", "eval.sigma_rels=[0.05,0.15]")
    row = results["rows"][0]
    assert results["feature_extractor"]["name"] == "pooled_pixels_4x4"  # the extractor is named with every result
    for metric in ("fid", "kid_mean", "clip_score", "adherence_all"):
        interval = row["intervals"][metric]
        assert interval["low"] <= interval["high"] and interval["num_resamples"] == 20, metric
        assert row["comparison"][metric]["difference"] == 0.0 and row["comparison"][metric]["p_value"] == 1.0
        assert row["seed_spread"][metric]["num_seeds"] == 2
    assert row["seed_spread"]["fid"]["mean"] != row["fid"]  # seed 6 gave other images
    assert all(0.0 <= row[name] <= 1.0 for name in ("precision", "recall", "coverage"))
    memorization = row["memorization"]
    assert memorization["num_train"] == 256 and memorization["validation_share_flagged"] == 0.0
    assert [r["sigma_rel"] for r in results["posthoc_ema"]["rows"]] == [0.05, 0.15]
    assert results["posthoc_ema"]["rows"][0]["fid"] != results["posthoc_ema"]["rows"][1]["fid"]
    assert (tmp_path / "trust" / "samples_memorization_pairs.png").is_file()
    assert (tmp_path / "trust" / "fid_vs_sigma_rel.png").is_file()


def test_posthoc_ema_tool_writes_a_model_that_loads_with_the_synthesized_unet(tiny_checkpoint, tmp_path):
    from ldm.pipeline import TextToImagePipeline
    from ldm.tools.posthoc_ema import main
    from ldm.interchange.posthoc_ema import synthesize_state

    write_snapshots(tiny_checkpoint, tmp_path / "snapshots")
    out = main(["--model", str(tiny_checkpoint), "--snapshots", str(tmp_path / "snapshots"), "--sigma-rel", "0.08",
                "--out", str(tmp_path / "model")])
    loaded = TextToImagePipeline.from_pretrained(out)
    expected = synthesize_state(tmp_path / "snapshots", 0.08)
    for key, value in loaded.network.state_dict().items():
        if key in expected:
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_eval_job_scores_each_size_against_its_own_real_images_and_all_sizes_pooled(tiny_checkpoint, tmp_path):
    results = run_eval(tmp_path, tiny_checkpoint, "sizes", "+data.synthetic.sizes=[[32,32],[32,64]]",
                       "eval.sizes=[[32,32],[32,64]]", "eval.memorization=false", "eval.num_samples=8")
    assert list(results["per_size"]) == ["32x32", "32x64"]
    wide = results["per_size"]["32x64"]
    assert wide["num_reference"] + results["per_size"]["32x32"]["num_reference"] == results["reference"]["num_images"]
    (wide_row,) = wide["rows"]
    assert wide_row["num_samples"] == 8 and "adherence_position" in wide_row  # wide captions state a position
    assert "adherence_position" not in results["per_size"]["32x32"]["rows"][0]
    (overall,) = results["rows"]
    assert overall["num_samples"] == 16 and overall["fid"] >= 0
    assert overall["adherence_position"] == wide_row["adherence_position"]  # only the wide images state one
    assert (tmp_path / "sizes" / "samples_guidance_2.png").is_file()
