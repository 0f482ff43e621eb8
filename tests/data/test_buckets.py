"""Aspect-ratio buckets: the generated table, the nearest bucket, start-up errors naming the key, batches of one
bucket with the micro-conditioning sizes, latents stored and batched at their bucket's size, the bucket report."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.data.buckets import bucket_grid, cover_scale, nearest_bucket, resolve_buckets
from ldm.data.datamodule import LatentShardDataModule, ShardDataModule
from ldm.training.module_checks import check_resolution

BUCKETS = [[32, 32], [32, 64], [64, 32]]


def test_the_generated_table_has_sdxl_largest_bucket_of_each_width():
    grid = bucket_grid(1024 ** 2, 64, 4.0)
    for bucket in [(2048, 512), (1792, 576), (1600, 640), (1472, 704), (1344, 768), (1216, 832), (1152, 896),
                   (1088, 960), (1024, 1024), (960, 1088), (512, 2048)]:
        assert bucket in grid
    assert all(h * w <= 1024 ** 2 and h % 64 == 0 and w % 64 == 0 and max(h, w) <= 4 * min(h, w) for h, w in grid)
    assert [w / h for h, w in grid] == sorted(w / h for h, w in grid) and len(grid) == len(set(grid)) == 17


def test_nearest_bucket_is_symmetric_in_log_aspect():
    buckets = [(32, 32), (32, 64), (64, 32)]
    assert nearest_bucket(100, 200, buckets) == 1 and nearest_bucket(200, 100, buckets) == 2
    assert nearest_bucket(100, 141, buckets) == 0 and nearest_bucket(100, 142, buckets) == 1  # sqrt(2) between
    assert nearest_bucket(142, 100, buckets) == 2
    assert cover_scale(12, 24, (32, 64)) == pytest.approx(32 / 12)


@pytest.mark.parametrize(("buckets", "message"), [
    ([], r"data.buckets=\[\] is empty"),
    ([[32, 32], [64, 64]], r"data.buckets\[1\]=\[64, 64\] holds 4096 pixels, more than the budget"),
    ([[32, 32], [32]], r"data.buckets\[1\]=\[32\] must be a \[height, width\] pair"),
    ({"pixel_budget": 2048, "side_step": 0, "max_aspect_ratio": 2}, r"data.buckets.side_step=0"),
    ({"pixel_budget": 2048, "side_step": 32, "max_ratio": 2}, r"data.buckets.max_ratio is not an argument"),
])
def test_bad_buckets_stop_at_start_up_naming_the_key(buckets, message):
    with pytest.raises(ValueError, match=message):
        resolve_buckets(buckets, 48)
    with pytest.raises(ValueError, match=message):
        ShardDataModule(train_shards="x.tar", resolution=48, buckets=buckets, batch_size=4, num_workers=0,
                        train_epoch_length=8)


def test_a_bucket_side_the_models_cannot_divide_names_the_bucket():
    vae, unet = torch.nn.Module(), torch.nn.Module()
    vae.downsample_factor, unet.downsample_factor = 4, 2
    with pytest.raises(ValueError, match=r"data.buckets\[2\]=\[36, 64\]: 36 px gives 9-px latents.*multiple of 8"):
        check_resolution(36, vae, unet, key="data.buckets[2]=[36, 64]")


def test_the_mapping_form_generates_the_table():
    assert resolve_buckets({"pixel_budget": 4096, "side_step": 16, "max_aspect_ratio": 2}, 64) == [
        (80, 48), (64, 64), (48, 80)]


def test_batches_hold_one_bucket_with_their_sizes_and_the_report_counts_upscales(aspect_shards):
    module = ShardDataModule(train_shards=[str(p) for p in aspect_shards], resolution=48, buckets=BUCKETS,
                             batch_size=4, num_workers=0, train_epoch_length=60, shuffle_buffer=8)
    seen = set()
    for batch in module.train_dataloader():
        module.on_before_batch_transfer(batch, 0)
        height, width = batch["image"].shape[-2:]
        assert batch["target_size"].tolist() == [[height, width]] * 4 and batch["target_size"].dtype == torch.long
        for (oh, ow), (top, left) in zip(batch["original_size"].tolist(), batch["crop_coords"].tolist()):
            scale = max(height / oh, width / ow)
            assert 0 <= top <= round(oh * scale) - height and 0 <= left <= round(ow * scale) - width
            assert nearest_bucket(oh, ow, [tuple(b) for b in BUCKETS]) == BUCKETS.index([height, width])
        seen.add((height, width))
    assert seen == {(32, 32), (32, 64), (64, 32)}
    report = module.bucket_report()
    assert report["samples"] == 60 and sum(row["samples"] for row in report["buckets"]) == 60
    wide = next(row for row in report["buckets"] if (row["height"], row["width"]) == (32, 64))
    assert 0 < report["upscaled_over_2x"] == wide["upscaled_over_2x"] < wide["samples"]  # the 12x24 images
    validation = ShardDataModule(train_shards=str(aspect_shards[1]), val_shards=str(aspect_shards[0]), resolution=48,
                                 buckets=BUCKETS, bucket_crop="center", batch_size=4, num_workers=0,
                                 train_epoch_length=8)
    val_keys = [key for batch in validation.val_dataloader() for key in batch["key"]]
    assert len(val_keys) == 20  # every sample once, partial batches of each bucket included


def test_square_batches_carry_the_sizes_too(aspect_shards):
    module = ShardDataModule(train_shards=[str(p) for p in aspect_shards], resolution=32, batch_size=4,
                             num_workers=0, train_epoch_length=8, shuffle_buffer=0)
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["target_size"].tolist() == [[32, 32]] * 4
    assert batch["original_size"].shape == batch["crop_coords"].shape == (4, 2)


def test_latents_are_stored_at_their_bucket_and_batched_by_shape(aspect_shards, tmp_path):
    from ldm.data.precompute import precompute_latents
    from ldm.tools.precompute_latents import build

    vae, _, _ = build("configs/model/vae/tiny.yaml")
    summary = precompute_latents(
        str(aspect_shards[0]), tmp_path, vae, 48, {"vae": "tiny"}, batch_size=4,
        buckets=resolve_buckets(BUCKETS, 48))
    assert summary["written"] == 1 and json.loads((tmp_path / "latents.json").read_text())["vae"] == "tiny"
    module = LatentShardDataModule(train_shards=str(tmp_path / aspect_shards[0].name), batch_size=2, num_workers=0,
                                   train_mode="exactly_once", train_epoch_length=2)
    shapes = set()
    for batch in module.train_dataloader():
        height, width = batch["target_size"][0].tolist()
        latent_height, latent_width = batch["latent_mean"].shape[-2:]
        assert (batch["target_size"] == batch["target_size"][0]).all()
        assert height / latent_height == width / latent_width == vae.downsample_factor
        shapes.add((height, width))
    assert len(shapes) >= 2
    with pytest.raises(ValueError, match="data.buckets does not apply to data=latents"):
        LatentShardDataModule(train_shards="x.tar", buckets=BUCKETS, resolution=48)
