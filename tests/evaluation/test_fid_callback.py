"""The in-training FID callback logs val/fid after each validation, from EMA samples, through train.py's path."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("train_entry_for_fid", ROOT / "train.py")
train_entry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_entry)


def test_fid_callback_logs_fid_and_adherence_at_each_validation(tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "experiment=demo", "callbacks=diffusion_fid", "logger=csv", "model.latents.vae_weights=null",
            "model.latents.scale_factor=0.5", "trainer.max_steps=4", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "data.batch_size=8",
            "data.val_batch_size=8", "data.num_workers=0", "data.synthetic.num_train=128", "data.synthetic.num_val=16",
            "data.synthetic.samples_per_shard=64", "callbacks.sample_grid.num_inference_steps=2",
            "callbacks.sample_grid.prompts=[a red circle on a white background]",
            "callbacks.fid.num_samples=6", "callbacks.fid.num_inference_steps=2",
        ])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        # Pooled pixels instead of the scene classifier, which would train for seconds on first use.
        cfg.callbacks.fid.feature_extractor = {"_target_": "ldm.evaluation.metrics.PooledPixelFeatures",
                                               "_partial_": True, "size": 2}
        del cfg.hydra
    metrics = train_entry.train(cfg)
    assert "val/fid" in metrics and metrics["val/fid"] > 0
    assert 0.0 <= metrics["val/adherence_all"] <= 1.0
    (metrics_file,) = (tmp_path / "run").glob("csv/version_*/metrics.csv")
    with metrics_file.open() as handle:
        logged = [(int(row["step"]), float(row["val/fid"])) for row in csv.DictReader(handle) if row.get("val/fid")]
    assert [step for step, _ in logged] == [1, 3]  # Lightning logs validation at the step before the increment
    assert (tmp_path / "models" / "eval" / "reference").is_dir()  # reference features cached once
