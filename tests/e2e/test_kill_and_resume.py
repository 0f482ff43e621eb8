"""A run killed with SIGKILL and resumed ends with the weights of an uninterrupted run, and leaves no corrupt checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# Two loader workers whose epochs (47 samples per rank, batch 8) hold 3 and 2 batches: the resume
# point (step 8) lies inside the second epoch, after an uneven round-robin over the workers.
RUN = [
    "experiment=demo", "model.vae_weights=null", "callbacks=default", "logger=csv",
    "trainer.max_steps=20", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
    "trainer.deterministic=true", "trainer.enable_progress_bar=false",
    "model.lr_schedule.warmup_steps=5", "callbacks.throughput.window=5",
    "data.synthetic.num_train=512", "data.synthetic.num_val=64", "data.synthetic.samples_per_shard=128",
    "data.batch_size=8", "data.val_batch_size=8", "data.num_workers=2", "data.train_epoch_length=47",
    "data.shuffle_buffer=16",
]


def train_command(run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "train.py", *RUN, *extra, f"hydra.run.dir={run_dir}"]


def lora_run(root: Path) -> tuple[str, ...]:
    """Overrides that make the run a LoRA fine-tune of a tiny base model written as a diffusers folder."""
    from hydra import compose, initialize_config_dir

    from ldm.config import instantiate_module, register_resolvers
    from ldm.tools.export import export_module

    base = root / "base"
    if not base.exists():
        register_resolvers()
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=["model.vae_weights=null", "model.latent_scale_factor=0.7"])
        torch.manual_seed(0)
        export_module(instantiate_module(cfg.model), base, format="diffusers")
    return (f"+model.pretrained.path={base}", "+model.lora.rank=4", "+model.lora.dropout=0.1")


def bucketed_run(root: Path, writer) -> tuple[str, ...]:
    """Overrides that train on images of several aspect ratios in three buckets (instead of the square set)."""
    shards = writer(root / "aspect", num_samples=512, samples_per_shard=128, seed=2)
    val = writer(root / "aspect", num_samples=64, samples_per_shard=64, seed=3, prefix="val")
    return (f"data.train_shards=[{','.join(str(p) for p in shards)}]", f"data.val_shards={val[0]}",
            "data.synthetic=null", "data.resolution=48", "data.buckets=[[32,32],[32,64],[64,32]]")


def environment(root: Path) -> dict[str, str]:
    return dict(os.environ, LDM_ROOT=str(root), HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora", "buckets"])
def test_sigkilled_run_resumes_to_the_same_weights(tmp_path, variant, aspect_shard_writer):
    """Also for a LoRA run (adapter dropout on, so its random draws must be restored too), and for a run
    over bucketed images of several aspect ratios (batches of different shapes; queued samples resumed)."""
    env = environment(tmp_path)
    extra = {"full": (), "lora": lora_run(tmp_path) if variant == "lora" else (),
             "buckets": bucketed_run(tmp_path, aspect_shard_writer) if variant == "buckets" else ()}[variant]
    uninterrupted = tmp_path / "uninterrupted"
    result = subprocess.run(train_command(uninterrupted, extra), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(killed, extra), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_000008.ckpt").exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the run to be killed wrote no step-8 checkpoint in time"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the whole job, dataloader workers included
    process.wait()
    assert not (killed / "checkpoints" / "step_000020.ckpt").exists(), "the run finished before it was killed"
    for path in (killed / "checkpoints").iterdir():  # whole checkpoints only; no temporary file is left as one
        assert path.name.endswith(".ckpt") or ".tmp-" in path.name, path
        if path.name.endswith(".ckpt"):
            torch.load(path, map_location="cpu", weights_only=True)

    resumed = subprocess.run(train_command(killed, extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr

    expected, got = final_state(uninterrupted), final_state(killed)
    assert got["global_step"] == expected["global_step"] == 20
    assert got["ShardDataModule"]["train_batches_consumed"] == expected["ShardDataModule"]["train_batches_consumed"]
    trained = [key for key in expected["state_dict"] if key.startswith(("unet.", "ema_unet."))]
    assert trained
    if variant == "lora":  # the checkpoint is the adapters alone
        assert all(".lora_" in key for key in trained if key != "ema_unet.n_averaged")
    for key in trained:
        torch.testing.assert_close(got["state_dict"][key], expected["state_dict"][key], rtol=0, atol=0, msg=key)
    moments = expected["optimizer_states"][0]["state"]
    for index, state in moments.items():
        torch.testing.assert_close(got["optimizer_states"][0]["state"][index]["exp_avg"], state["exp_avg"],
                                   rtol=0, atol=0)
    assert got["lr_schedulers"][0]["last_epoch"] == expected["lr_schedulers"][0]["last_epoch"]
    if variant == "buckets":  # the batches did come in several shapes, counted over both runs of the killed job
        import json

        report, whole = (json.loads((run / "bucket_report.json").read_text()) for run in (killed, uninterrupted))
        # 2 of the 3: a worker's epoch here is ~24 samples, too few to fill a batch of the rarest (tall) bucket
        assert len([row for row in report["buckets"] if row["samples"]]) >= 2 and report == whole
