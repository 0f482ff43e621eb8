"""The shard pipeline: sample fields, exactly-once evaluation, disjoint ranks, equal epochs, counted skips."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.collate import collate_samples
from ldm.data.shards import image_text_dataset
from ldm.data.tars import read_tar_samples
from ldm.data.skips import SkipCounter


def paths(shards) -> list[str]:
    return [str(p) for p in shards]


def keys_of(dataset, num_workers: int = 0, batch_size: int = 8) -> list[str]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_samples)
    return [key for batch in loader for key in batch["key"]]


def all_keys(shards) -> list[str]:
    return sorted(key for shard in shards for key in read_tar_samples_keys(shard))


def read_tar_samples_keys(shard) -> list[str]:
    return [raw["__key__"] for raw in read_tar_samples(str(shard), SkipCounter())]


def test_samples_have_the_documented_fields_shapes_and_ranges(uneven_shards):
    dataset = image_text_dataset(paths(uneven_shards), resolution=16, train=True, epoch_length=12, shuffle_buffer=8)
    samples = list(dataset)
    assert len(samples) == 12
    for sample in samples:
        assert sample["image"].shape == (3, 16, 16) and sample["image"].dtype == torch.float32
        assert sample["image"].min() >= -1.0 and sample["image"].max() <= 1.0
        assert sample["original_size"].tolist() == [32, 32] and sample["original_size"].dtype == torch.long
        assert sample["crop_coords"].tolist() == [0, 0]  # a square image resized to the crop size
        assert sample["caption"].startswith("a ") and sample["caption"].endswith(" background")
        assert isinstance(sample["key"], str) and sample["skipped"] == {}
    images = torch.stack([s["image"] for s in samples])
    assert images.min() < -0.9 and images.max() > 0.9  # the full range is used (saturated colours)
    batch = collate_samples(samples[:5])
    assert batch["image"].shape == (5, 3, 16, 16) and batch["original_size"].shape == (5, 2)
    assert len(batch["caption"]) == 5 and batch["skipped"] == {}


def test_resize_short_side_then_crop_centre_or_random(tmp_path, helpers):
    """A 48x32 image at resolution 16 is resized to 24x16: crops start at left 0..8 (centre: 4)."""
    gradient = np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], (32, 1, 3))
    files = []
    for index in range(40):
        key = f"{index:09d}"
        files += [(f"{key}.png", helpers.image_bytes(Image.fromarray(gradient))), (f"{key}.txt", b"a gradient")]
    shard = helpers.write_tar(tmp_path / "wide.tar", files)
    evaluation = list(image_text_dataset(str(shard), 16, train=False))
    assert {tuple(s["crop_coords"].tolist()) for s in evaluation} == {(0, 4)}
    assert evaluation[0]["original_size"].tolist() == [32, 48]
    resized = np.asarray(Image.fromarray(gradient).resize((24, 16), Image.Resampling.BICUBIC))
    expected = torch.from_numpy(resized[:, 4:20].copy()).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(evaluation[0]["image"], expected)
    training = list(image_text_dataset(str(shard), 16, train=True, epoch_length=40, shuffle_buffer=0))
    lefts = {s["crop_coords"][1].item() for s in training}
    assert lefts <= set(range(9)) and len(lefts) >= 5
    for sample in training:  # the crop shows the gradient from its left offset
        left = sample["crop_coords"][1].item()
        assert sample["image"][0, 0, 0].item() == pytest.approx(resized[0, left, 0] / 127.5 - 1, abs=1e-6)


def test_caption_comes_from_json_when_there_is_no_txt_and_transparency_goes_on_white(tmp_path, helpers):
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    shard = helpers.write_tar(tmp_path / "json.tar", [
        ("a.png", helpers.image_bytes(transparent)),
        ("a.json", json.dumps({"caption": "  from the metadata "}).encode()),
        ("b.jpg", helpers.image_bytes(Image.new("RGB", (8, 8), (0, 0, 255)), "JPEG")),
        ("b.txt", b"a jpeg"),
    ])
    first, second = image_text_dataset(str(shard), 8, train=False)
    assert first["caption"] == "from the metadata"
    assert torch.allclose(first["image"], torch.ones(3, 8, 8))  # fully transparent -> white, not red
    assert second["caption"] == "a jpeg" and second["image"][2].mean() > 0.9


def test_evaluation_reads_every_sample_exactly_once_with_two_workers(uneven_shards):
    dataset = image_text_dataset(paths(uneven_shards), 32, train=False)
    keys = keys_of(dataset, num_workers=2)
    assert sorted(keys) == all_keys(uneven_shards) and len(keys) == 100


@pytest.mark.parametrize("num_shards", [1, 5])
def test_evaluation_is_exactly_once_over_two_ranks_and_two_workers(uneven_shards, num_shards):
    """With 5 shards they are split by rank; with 1 shard (fewer than ranks) its samples are."""
    shards = uneven_shards[:num_shards]
    seen = []
    for rank in range(2):
        seen += keys_of(image_text_dataset(paths(shards), 32, train=False, rank=rank, world_size=2), num_workers=2)
    assert sorted(seen) == all_keys(shards)


def test_training_ranks_read_disjoint_shards_and_yield_equal_epochs(uneven_shards):
    """Rank 0 holds shards 0, 2, 4 (52 samples), rank 1 shards 1, 3 (48): both yield 70 per epoch,
    the same number of full batches, from their own shards only."""
    shard_of = {key: index for index, shard in enumerate(uneven_shards) for key in read_tar_samples_keys(shard)}
    batches_per_rank, shards_per_rank = [], []
    for rank in range(2):
        dataset = image_text_dataset(paths(uneven_shards), 32, train=True, epoch_length=70, shuffle_buffer=16,
                                     rank=rank, world_size=2)
        keys = keys_of(dataset, num_workers=2, batch_size=8)
        assert len(keys) == 70
        shards_per_rank.append({shard_of[key] for key in keys})
        full_batches = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=collate_samples,
                                                   drop_last=True)
        batches_per_rank.append(sum(1 for _ in full_batches))
    assert shards_per_rank == [{0, 2, 4}, {1, 3}]
    assert batches_per_rank[0] == batches_per_rank[1] == 8  # 35 samples per worker -> 4 full batches each


def test_rank_comes_from_the_environment(uneven_shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dataset = image_text_dataset(paths(uneven_shards), 32, train=True, epoch_length=10)
    assert (dataset.rank, dataset.world_size) == (1, 2)


def test_fewer_training_shards_than_ranks_is_a_clear_error(uneven_shards):
    with pytest.raises(ValueError, match="2 training shard.* 4 ranks"):
        image_text_dataset(paths(uneven_shards[:2]), 32, train=True, epoch_length=10, rank=0, world_size=4)


def test_training_stream_is_reproducible_and_changes_with_epoch_and_seed(uneven_shards):
    def stream(seed: int, epochs: int = 1) -> list[list[tuple[str, str]]]:
        dataset = image_text_dataset(paths(uneven_shards), 32, train=True, epoch_length=30, seed=seed,
                                     caption_dropout_prob=0.5, shuffle_buffer=16)
        return [[(s["key"], s["caption"]) for s in dataset] for _ in range(epochs)]

    first_epoch, second_epoch = stream(0, epochs=2)
    assert stream(0) == [first_epoch]
    assert second_epoch != first_epoch
    assert stream(1) != [first_epoch]


def test_training_stream_is_endless_and_shuffled(uneven_shards):
    dataset = image_text_dataset(paths(uneven_shards), 32, train=True, epoch_length=250, shuffle_buffer=32)
    keys = [s["key"] for s in dataset]
    assert len(keys) == 250 and set(keys) == set(all_keys(uneven_shards))  # more than one pass
    assert keys[:24] != sorted(keys[:24])


def test_caption_dropout_rate_is_as_set_and_only_in_training(uneven_shards):
    dataset = image_text_dataset(paths(uneven_shards), 32, train=True, epoch_length=800, caption_dropout_prob=0.25)
    dropped = sum(sample["caption"] == "" for sample in dataset) / 800
    assert abs(dropped - 0.25) < 0.06  # 4 standard deviations of a binomial rate at n=800
    evaluation = image_text_dataset(paths(uneven_shards), 32, train=False, caption_dropout_prob=0.25)
    assert all(sample["caption"] for sample in evaluation)
    assert all(s["caption"] for s in image_text_dataset(paths(uneven_shards), 32, train=True, epoch_length=100))


def damaged_copy(source: Path, target: Path) -> dict[str, list[str]]:
    """Copy a shard, damaging samples in each per-sample way; returns the damaged keys by reason."""
    with tarfile.open(source) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    plan = {"corrupt_png": keys[1:3], "truncated_png": keys[4:5], "no_caption": keys[6:7], "blank_caption": keys[8:9],
            "invalid_json": keys[10:11], "no_image": keys[12:13], "last_sample_corrupt": keys[-1:]}
    with tarfile.open(target, "w") as tar:
        for member, data in members:
            key, extension = member.name.split(".", 1)
            if extension == "png" and key in plan["corrupt_png"] + plan["last_sample_corrupt"]:
                data = b"\x89PNG\r\n\x1a\n but not really"
            elif extension == "png" and key in plan["truncated_png"]:
                data = data[: len(data) // 2]
            elif extension == "png" and key in plan["no_image"]:
                continue
            elif extension == "txt" and key in plan["no_caption"]:
                continue
            elif extension == "json" and key in plan["no_caption"]:
                data = json.dumps({"width": 32, "caption": ""}).encode()
            elif extension == "txt" and key in plan["blank_caption"]:
                data = b" \n "
            elif extension == "json" and key in plan["blank_caption"]:
                data = json.dumps({"width": 32, "caption": "  "}).encode()
            elif extension == "json" and key in plan["invalid_json"]:
                data = b"{not json"
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return plan


def truncated_copy(source: Path, target: Path) -> list[str]:
    """Copy a shard cut in the middle of a PNG's data; returns the keys of the samples read whole."""
    with tarfile.open(source) as tar:
        members = tar.getmembers()
    cut_member = next(m for m in members[len(members) // 2 :] if m.name.endswith(".png"))
    target.write_bytes(source.read_bytes()[: cut_member.offset_data + cut_member.size // 2])
    cut_key = cut_member.name.split(".")[0]
    return [k for k in dict.fromkeys(m.name.split(".")[0] for m in members) if k < cut_key]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dirty_data_is_skipped_counted_by_reason_and_every_good_sample_seen(uneven_shards, tmp_path, num_workers):
    plan = damaged_copy(uneven_shards[0], tmp_path / "damaged.tar")
    whole_before_cut = truncated_copy(uneven_shards[1], tmp_path / "truncated.tar")
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar archive" * 40)
    urls = [str(tmp_path / "damaged.tar"), str(tmp_path / "truncated.tar"), str(tmp_path / "garbage.tar"),
            str(tmp_path / "missing.tar"), str(uneven_shards[2])]
    loader = torch.utils.data.DataLoader(image_text_dataset(urls, 32, train=False), batch_size=8,
                                         num_workers=num_workers, collate_fn=collate_samples)
    keys, skipped = [], Counter()
    for batch in loader:  # counts made in the workers arrive with the batches
        keys += batch["key"]
        skipped.update(batch["skipped"])

    damaged = {key for keys_ in plan.values() for key in keys_}
    expected = ([k for k in read_tar_samples_keys(uneven_shards[0]) if k not in damaged] + whole_before_cut
                + read_tar_samples_keys(uneven_shards[2]))
    assert sorted(keys) == sorted(expected)
    assert dict(skipped) == {
        "corrupt_image": 4,  # two garbage PNGs, one cut in half, and the last sample's
        "missing_caption": 2,
        "invalid_json": 1,
        "missing_image": 1,
        "truncated_tar": 1,
        "unreadable_shard": 2,  # not a tar; no such file
    }


def test_a_tar_cut_at_a_block_boundary_is_counted_as_truncated(uneven_shards, tmp_path):
    """tarfile takes such a cut for the archive's end; the missing end-of-archive blocks give it away."""
    data = uneven_shards[0].read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: (len(data) // 2) // 512 * 512])
    counter = SkipCounter()
    samples = list(read_tar_samples(str(tmp_path / "cut.tar"), counter))
    assert 0 < len(samples) < 24 and counter.as_dict() == {"truncated_tar": 1}
    whole = SkipCounter()
    assert len(list(read_tar_samples(str(uneven_shards[0]), whole))) == 24 and whole.total == 0


def test_training_survives_dirty_shards_and_reports_skips(uneven_shards, tmp_path):
    damaged_copy(uneven_shards[0], tmp_path / "damaged.tar")
    truncated_copy(uneven_shards[1], tmp_path / "truncated.tar")
    counter = SkipCounter()
    dataset = image_text_dataset([str(tmp_path / "damaged.tar"), str(tmp_path / "truncated.tar")], 32, train=True,
                                 epoch_length=120, shuffle_buffer=8, skip_counter=counter)
    samples = list(dataset)
    assert len(samples) == 120
    attached = Counter()
    for sample in samples:
        attached.update(sample["skipped"])
    assert attached["corrupt_image"] >= 4 and attached["truncated_tar"] >= 1
    assert attached.keys() <= counter.as_dict().keys() and counter.total >= sum(attached.values())


def test_unreadable_shards_only_is_an_error_not_a_hang(tmp_path):
    dataset = image_text_dataset([str(tmp_path / "missing-a.tar"), str(tmp_path / "missing-b.tar")], 32,
                                 train=True, epoch_length=10)
    with pytest.raises(RuntimeError, match="could read no sample"):
        next(iter(dataset))


def test_skip_warnings_are_limited_per_reason(tmp_path, caplog):
    counter = SkipCounter(warn_limit=2)
    with caplog.at_level("WARNING", logger="ldm.data"):
        for index in range(5):
            counter.add("corrupt_image", f"sample {index}")
        counter.add("invalid_json", "sample 9")
    assert len(caplog.records) == 3 and counter.as_dict() == {"corrupt_image": 5, "invalid_json": 1}
    assert counter.take_new() == {"corrupt_image": 5, "invalid_json": 1} and counter.take_new() == {}
    assert counter.total == 6


def test_collate_sums_skip_counts():
    sample = {"image": torch.zeros(3, 2, 2), "caption": "c", "key": "k", "original_size": torch.tensor([2, 2]),
              "crop_coords": torch.tensor([0, 0])}
    batch = collate_samples([{**sample, "skipped": {"corrupt_image": 2}},
                             {**sample, "skipped": {"corrupt_image": 1, "invalid_json": 1}}, {**sample, "skipped": {}}])
    assert batch["skipped"] == {"corrupt_image": 3, "invalid_json": 1}
    assert batch["image"].shape == (3, 3, 2, 2) and batch["key"] == ["k", "k", "k"]


def test_invalid_arguments_name_the_value(uneven_shards):
    with pytest.raises(ValueError, match="resolution=0"):
        image_text_dataset(paths(uneven_shards), 0, train=False)
    with pytest.raises(ValueError, match="caption_dropout_prob=1.5"):
        image_text_dataset(paths(uneven_shards), 32, train=True, caption_dropout_prob=1.5)
    with pytest.raises(ValueError, match="names no shard"):
        image_text_dataset([], 32, train=False)
