"""Both demo stages run for a few steps through Hydra's compose API, as train.py runs them."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
train_entry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_entry)

SMALL_DATA = [
    "data.synthetic.num_train=512",
    "data.synthetic.num_val=64",
    "data.synthetic.samples_per_shard=128",
    "data.batch_size=16",
    "data.val_batch_size=16",
    "data.num_workers=1",
    "trainer.limit_val_batches=1",
]


def compose_run(root: Path, run_dir: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.output_dir = str(run_dir)
        del cfg.hydra
    return cfg


def logged(run_dir: Path, name: str) -> list[float]:
    """Values of one metric in the CSV logger's file, in step order."""
    (metrics_file,) = run_dir.glob("csv/version_*/metrics.csv")
    with metrics_file.open() as handle:
        return [float(row[name]) for row in csv.DictReader(handle) if row.get(name)]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    run_dir = root / "runs" / "vae"
    cfg = compose_run(root, run_dir, ["experiment=demo_vae", "logger=csv", "trainer.max_steps=40",
                                      "trainer.val_check_interval=20", *SMALL_DATA])
    train_entry.train(cfg)
    return root, run_dir


@pytest.mark.slow
def test_stage1_writes_vae_weights_with_scale_factor_and_learns(stage1):
    from ldm.checkpoints import read_metadata

    root, run_dir = stage1
    weights = root / "models" / "demo" / "vae.safetensors"
    assert weights.is_file()
    scale = float(read_metadata(weights)["latent_scale_factor"])
    assert 0.01 < scale < 100.0
    losses = logged(run_dir, "train/loss")
    # 40 steps: the loss falls by a third or more on every run seen; 0.8 leaves room for noise
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_stage2_trains_logs_to_wandb_and_writes_checkpoint_and_grid(stage1):
    root, _ = stage1
    run_dir = root / "runs" / "ldm"
    cfg = compose_run(root, run_dir, [
        "experiment=demo", "logger=[csv,wandb]", "trainer.max_steps=40", "trainer.val_check_interval=20",
        "model.lr_schedule.warmup_steps=5", "model.optimizer.lr=1e-3",
        "callbacks.sample_grid.num_inference_steps=4", *SMALL_DATA,
    ])
    metrics = train_entry.train(cfg)
    assert "val/loss" in metrics
    losses = logged(run_dir, "train/loss")
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:5]) / 5
    assert len(logged(run_dir, "lr-AdamW")) == 40
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "samples" / "final.png").is_file()
    assert (run_dir / "samples" / "step_000020.png").is_file()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs and any(offline_runs[0].rglob("*.wandb"))

    from ldm.checkpoints import read_metadata
    from ldm.pipeline import TextToImagePipeline

    pipeline = TextToImagePipeline.from_pretrained(run_dir / "checkpoints" / "last.ckpt")
    stored = float(read_metadata(root / "models" / "demo" / "vae.safetensors")["latent_scale_factor"])
    assert pipeline.latent_scale_factor == pytest.approx(stored)
    images = pipeline(["a red circle on a white background"], height=32, width=32, num_inference_steps=3)
    assert images.shape == (1, 3, 32, 32)

    from ldm.tools.sample import main as sample_main

    out_dir = root / "sampled"
    paths = sample_main(["--ckpt", str(run_dir / "checkpoints" / "last.ckpt"), "--prompt", "a red circle on a white background",
                         "--prompt", "a blue square on a gray background", "--num-images", "2", "--sampler", "dpmpp_2m",
                         "--karras-sigmas", "--steps", "3", "--seed", "7", "--out-dir", str(out_dir)])
    assert len(paths) == 4 and all(p.is_file() for p in paths)
    assert (out_dir / "grid.png").is_file()
    with pytest.raises(ValueError, match="--eta applies to --sampler ddim"):  # run_cli: "error: ...", exit 2
        sample_main(["--ckpt", str(run_dir / "checkpoints" / "last.ckpt"), "--prompt", "x", "--sampler", "euler",
                     "--eta", "0.5"])
