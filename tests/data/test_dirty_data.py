"""About 5% damage of every kind, over 2 ranks x 2 workers: the run finishes, every good sample is seen
once, each skip is counted under its reason; the skip-rate ceiling stops broken data and names the shard.
Each test runs on square images and on images of several aspect ratios in buckets (batches of one bucket)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from ldm.data.shards import image_text_dataset
from ldm.data.synthetic import write_synthetic_shards

# Per-sample damage: kind -> (what is done, the reason it is counted under).
DAMAGE = {
    "corrupt_image": "corrupt_image",
    "truncated_image": "corrupt_image",
    "no_caption": "missing_caption",
    "empty_caption": "missing_caption",
    "invalid_json": "invalid_json",
    "no_image": "missing_image",
}


def damage_copy(source: Path, target: Path, plan: dict[str, str]) -> None:
    """Copy a synthetic shard, damaging the samples in ``plan`` ({key: kind})."""
    with tarfile.open(source) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(target, "w") as tar:
        for member, data in members:
            key, extension = member.name.split(".", 1)
            kind = plan.get(key)
            if extension == "png" and kind == "corrupt_image":
                data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2
            elif extension == "png" and kind == "truncated_image":
                data = data[: len(data) // 2]
            elif extension == "png" and kind == "no_image":
                continue
            elif extension == "txt" and kind == "no_caption":
                continue
            elif extension == "json" and kind in ("no_caption", "empty_caption"):
                data = json.dumps({"width": 32}).encode()
            elif extension == "txt" and kind == "empty_caption":
                data = b"  \n"
            elif extension == "json" and kind == "invalid_json":
                data = b'{"caption": "cut here'
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


BUCKETS = [(32, 32), (32, 64), (64, 32)]


@pytest.fixture(scope="module", params=["square", "buckets"])
def dirty_set(tmp_path_factory, aspect_shard_writer, request):
    """12 shards of 20 samples (240): 12 samples damaged, 2 of each kind (5%), spread over shards 0-5;
    shard 6 cut in the middle of an image; plus a shard that is not a tar and a pipe: command that fails.
    Shard 7 is read through a working pipe: command. Returns (urls, good keys, expected counts, damaged shard)."""
    directory = tmp_path_factory.mktemp("dirty")
    if request.param == "buckets":
        clean = aspect_shard_writer(directory / "clean", num_samples=240, samples_per_shard=20, seed=5)
    else:
        clean = write_synthetic_shards(directory / "clean", num_samples=240, samples_per_shard=20, seed=5)
    urls, good = [], []
    kinds = [kind for kind in DAMAGE for _ in range(2)]
    for index, shard in enumerate(clean):
        with tarfile.open(shard) as tar:
            keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
            members = tar.getmembers()
        if index < 6:
            plan = {keys[3]: kinds[2 * index], keys[11]: kinds[2 * index + 1]}
            target = directory / f"damaged-{index}.tar"
            damage_copy(shard, target, plan)
            urls.append(str(target))
            good += [key for key in keys if key not in plan]
        elif index == 6:
            cut = next(m for m in members[len(members) // 2 :] if m.name.endswith(".png"))
            target = directory / "truncated.tar"
            target.write_bytes(shard.read_bytes()[: cut.offset_data + cut.size // 2])
            urls.append(str(target))
            good += [key for key in keys if key < cut.name.split(".")[0]]
        elif index == 7:
            urls.append(f"pipe:cat {shard}")
            good += keys
        else:
            urls.append(str(shard))
            good += keys
    (directory / "garbage.tar").write_bytes(b"not a tar archive at all " * 100)
    urls += [str(directory / "garbage.tar"), f"pipe:cat {directory / 'no-such-shard.tar'}"]
    expected = Counter(DAMAGE[kind] for kind in kinds)
    expected.update({"truncated_tar": 1, "unreadable_shard": 2})
    return urls, good, dict(expected), urls[0], BUCKETS if request.param == "buckets" else None


def read_all(urls, rank: int, buckets=None, **options) -> tuple[list[str], Counter]:
    """Batches of 8 made in each of 2 workers (one bucket each), as the datamodule reads them."""
    dataset = image_text_dataset(urls, 48 if buckets else 32, train=False, rank=rank, world_size=2, buckets=buckets,
                                 batch_size=8, **options)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    keys, skipped = [], Counter()
    for batch in loader:
        keys += batch["key"]
        skipped.update(batch["skipped"])
        assert batch["image"].shape[-2:] == tuple(batch["target_size"][0].tolist())
        assert (batch["target_size"] == batch["target_size"][0]).all()  # one bucket per batch
    return keys, skipped


def test_five_percent_damage_of_every_kind_is_skipped_counted_and_every_good_sample_seen_once(dirty_set):
    urls, good, expected, _, buckets = dirty_set
    keys, skipped = [], Counter()
    for rank in range(2):
        rank_keys, rank_skipped = read_all(urls, rank, buckets, max_skip_rate=0.2, skip_rate_min_samples=50)
        keys += rank_keys
        skipped += rank_skipped
    assert Counter(keys) == Counter(good)  # every good sample, exactly once
    assert dict(skipped) == expected


def test_resampled_training_streams_through_the_damage(dirty_set):
    urls, good, _, _, buckets = dirty_set
    dataset = image_text_dataset(urls, 48 if buckets else 32, train=True, epoch_length=300, shuffle_buffer=16,
                                 rank=0, world_size=2, max_skip_rate=0.2, skip_rate_min_samples=50, buckets=buckets)
    samples = list(dataset)
    assert len(samples) == 300 and {s["key"] for s in samples} <= set(good)
    assert sum(sum(s["skipped"].values()) for s in samples) > 0


def test_the_skip_rate_ceiling_stops_broken_data_naming_the_shard_and_reason(dirty_set):
    urls, _, _, damaged_shard, buckets = dirty_set
    with pytest.raises(RuntimeError, match="exceeds data.max_skip_rate=0.05") as caught:
        read_all([damaged_shard] * 3, rank=0, buckets=buckets, max_skip_rate=0.05, skip_rate_min_samples=10)
    assert "damaged-0.tar (corrupt_image: 1" in str(caught.value)


def test_only_unreadable_shards_is_an_error_naming_them_not_a_hang(tmp_path):
    urls = [str(tmp_path / "missing-a.tar"), str(tmp_path / "missing-b.tar")]
    with pytest.raises(RuntimeError, match="could read no sample.*missing-a.tar"):
        next(iter(image_text_dataset(urls, 32, train=True, epoch_length=10, max_skip_rate=0.5)))
