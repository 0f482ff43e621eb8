"""Multi-process training through train.py, and a run that meets a corrupt image and goes on."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL_DATA = [
    "data.synthetic.num_train=512", "data.synthetic.num_val=64", "data.synthetic.samples_per_shard=128",
    "data.batch_size=8", "data.val_batch_size=8", "data.num_workers=1", "trainer.limit_val_batches=1",
]


def run_train(tmp_path: Path, overrides: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, LDM_ROOT=str(tmp_path), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.whole_machine
@pytest.mark.slow
def test_ddp_two_processes_train_to_the_end(tmp_path):
    """Two CPU ranks (gloo), each on its own shards, reach max_steps and save a final checkpoint."""
    result = run_train(tmp_path, [
        "experiment=demo_vae", "trainer=ddp", "trainer.max_steps=6", "trainer.val_check_interval=3", "logger=csv",
        *SMALL_DATA,
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = tmp_path.glob("outputs/train/demo_vae/*/checkpoints/last.ckpt")
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert "world_size: 2" in result.stderr + result.stdout or "GLOBAL_RANK: 1" in result.stderr + result.stdout


@pytest.mark.whole_machine
@pytest.mark.slow
def test_ddp_over_uneven_buckets_finishes_and_saves_every_ranks_position(tmp_path, aspect_shard_writer):
    """Two CPU ranks whose batches differ in shape at the same step (each rank's images fall into the
    buckets unevenly): only gradients are all-reduced, so the run reaches max_steps; the checkpoint holds
    both ranks' stream positions, and the bucket report sums both ranks' samples."""
    shards = aspect_shard_writer(tmp_path / "aspect", num_samples=160, samples_per_shard=40, seed=4)
    val = aspect_shard_writer(tmp_path / "aspect", num_samples=32, samples_per_shard=16, seed=5, prefix="val")
    result = run_train(tmp_path, [
        "experiment=demo_vae", "trainer=ddp", "trainer.max_steps=6", "trainer.val_check_interval=3", "logger=csv",
        f"data.train_shards=[{','.join(str(p) for p in shards)}]", "data.synthetic=null",
        f"data.val_shards='{val[0].parent}/val-{{000000..000001}}.tar'", "trainer.limit_val_batches=2",
        "data.resolution=48", "data.buckets=[[32,32],[32,64],[64,32]]", "data.batch_size=4",
        "data.num_workers=1", "data.train_epoch_length=16", "data.shuffle_buffer=8",
    ], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = tmp_path.glob("outputs/train/demo_vae/*/checkpoints/last.ckpt")
    import json

    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    ranks = state["ShardDataModule"]["ranks"]
    assert len(ranks) == 2 and all(rank["workers"] for rank in ranks)
    shapes_by_rank = [{tuple(row[:2]) for row in rank["bucket_counts"]} for rank in ranks]
    assert all(len(shapes) >= 2 for shapes in shapes_by_rank)
    (report,) = tmp_path.glob("outputs/train/demo_vae/*/bucket_report.json")
    assert json.loads(report.read_text())["samples"] == 2 * 6 * 4  # both ranks, 6 steps of 4


def corrupt_first_image(shard: Path) -> str:
    """Replace the first PNG in a tar shard by garbage bytes; returns its key."""
    with tarfile.open(shard) as source:
        members = [(m, source.extractfile(m).read()) for m in source.getmembers()]
    damaged_key = next(m.name.split(".")[0] for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(shard, "w") as target:
        for member, data in members:
            if member.name == f"{damaged_key}.png":
                data = b"\x89PNG not really an image" + data[:7]
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    return damaged_key


@pytest.mark.slow
def test_a_corrupt_image_is_skipped_counted_and_the_run_goes_on(tmp_path):
    from ldm.data.synthetic import ensure_synthetic_dataset

    train_spec, val_spec = ensure_synthetic_dataset(tmp_path / "data", num_train=256, num_val=64, samples_per_shard=128)
    shards = sorted((tmp_path / "data").rglob("train-*.tar"))
    for shard in shards:
        corrupt_first_image(shard)
    result = run_train(tmp_path, [
        "experiment=demo_vae", "trainer.max_steps=40", "trainer.val_check_interval=20", "logger=csv",
        f"data.train_shards='{train_spec}'", f"data.val_shards='{val_spec}'", "data.synthetic=null",
        "data.batch_size=8", "data.val_batch_size=8", "data.num_workers=1", "trainer.limit_val_batches=1",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = tmp_path.glob("outputs/train/demo_vae/*/csv/version_0/metrics.csv")
    import csv

    with metrics.open() as handle:
        rows = list(csv.DictReader(handle))
    skip_columns = [c for c in rows[0] if c.startswith("data/skipped/")]
    assert skip_columns, f"no skip counter logged; columns: {list(rows[0])}"
    totals = [float(r[c]) for r in rows for c in skip_columns if r.get(c)]
    assert max(totals) >= 1
    assert "skip" in (result.stderr + result.stdout).lower()


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory) -> tuple[str, str]:
    """3 training shards of 40, 40 and 24 samples and 3 validation shards of 20, 20 and 12: split by rank,
    rank 0 gets 64 training and 32 validation samples, rank 1 only 40 and 20."""
    from ldm.data.synthetic import write_synthetic_shards

    directory = tmp_path_factory.mktemp("odd")
    write_synthetic_shards(directory, num_samples=104, samples_per_shard=40, seed=1, split="train")
    write_synthetic_shards(directory, num_samples=52, samples_per_shard=20, seed=1, split="val")
    return str(directory / "train-{000000..000002}.tar"), str(directory / "val-{000000..000002}.tar")


@pytest.mark.whole_machine
@pytest.mark.slow
@pytest.mark.parametrize(("train_mode", "steps_per_epoch"), [("resampled", 6), ("exactly_once", 5)])
def test_ddp_over_an_odd_number_of_shards_finishes_in_each_mode(tmp_path, odd_shards, train_mode, steps_per_epoch):
    """Ranks with uneven shares never hang or fall out of step over 2 epochs: resampled epochs are 48 samples
    (6 batches) on every rank by construction; exactly-once epochs end on both ranks when rank 1 runs out
    (5 batches of its 40 samples; without that, rank 0 waits for a 6th gradient all-reduce and the run
    fails). Validation reads every sample once, with 4 batches on rank 0 and 3 on rank 1."""
    train_spec, val_spec = odd_shards
    result = run_train(tmp_path, [
        "experiment=demo_vae", "data=shards", "trainer=ddp", "trainer.max_steps=-1", "trainer.max_epochs=2",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1.0", "logger=csv",
        f"data.train_shards='{train_spec}'", f"data.val_shards='{val_spec}'", f"data.train_mode={train_mode}",
        "data.resolution=32", "data.batch_size=8", "data.val_batch_size=8", "data.num_workers=1",
        "data.train_epoch_length=48", "data.shuffle_buffer=16",
    ], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = tmp_path.glob("outputs/train/demo_vae/*/csv/version_0/metrics.csv")
    import csv

    with metrics.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    steps_by_epoch = {}
    for row in rows:
        steps_by_epoch.setdefault(int(row["epoch"]), set()).add(int(row["step"]))
    assert {epoch: len(steps) for epoch, steps in steps_by_epoch.items()} == {0: steps_per_epoch, 1: steps_per_epoch}


@pytest.mark.slow
def test_train_py_with_data_latents_trains_from_precomputed_latents(tmp_path, odd_shards):
    """precompute_latents with the VAE the model loads, then `python train.py data=latents` runs to the end."""
    import torch

    from ldm.checkpoints import save_weights
    from ldm.tools import precompute_latents

    train_spec, val_spec = odd_shards
    vae, _, _ = precompute_latents.build(str(ROOT / "configs/model/vae/tiny.yaml"))
    weights = str(save_weights(vae, tmp_path / "vae.safetensors", {"latent_scale_factor": 0.8}))
    for spec, name in ((train_spec, "train"), (val_spec, "val")):
        precompute_latents.main(["--shards", spec, "--out-dir", str(tmp_path / "latents"), "--resolution", "32",
                                 "--vae", str(ROOT / "configs/model/vae/tiny.yaml"), "--vae-weights", weights,
                                 "--text-encoder", str(ROOT / "configs/model/text_encoder/tiny.yaml")])
    latents = tmp_path / "latents"
    result = run_train(tmp_path, [
        "experiment=demo", "data=latents", f"model.latents.vae_weights={weights}", "callbacks=default", "logger=csv",
        f"data.train_shards='{latents}/train-{{000000..000002}}.tar'",
        f"data.val_shards='{latents}/val-{{000000..000002}}.tar'", "data.use_text_states=true",
        "data.resolution=32", "data.batch_size=8", "data.val_batch_size=8", "data.num_workers=1",
        "data.train_epoch_length=16", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
    ], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = tmp_path.glob("outputs/train/demo/*/checkpoints/last.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4 and float(state["state_dict"]["latent_scale_factor"]) == pytest.approx(0.8)
