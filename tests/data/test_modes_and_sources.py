"""Explicit stream modes over 2 ranks x 2 workers, and weighted mixing of several shard sources."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ldm.data.collate import collate_samples
from ldm.data.shards import image_text_dataset
from ldm.data.tars import read_tar_samples
from ldm.data.skips import SkipCounter
from ldm.data.synthetic import write_synthetic_shards


def keys_of(dataset, num_workers: int = 2, batch_size: int = 4) -> list[str]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_samples)
    return [key for batch in loader for key in batch["key"]]


def shard_keys(shards) -> list[str]:
    return [raw["__key__"] for shard in shards for raw in read_tar_samples(str(shard), SkipCounter())]


@pytest.mark.parametrize("num_shards", [1, 3, 5])
def test_exactly_once_mode_over_2_ranks_x_2_workers_sees_every_sample_once(uneven_shards, num_shards):
    """Odd shard counts (1, 3, 5) give the ranks and workers uneven shares; together they see each sample once,
    also with training augmentation on (mode is independent of train)."""
    shards = [str(p) for p in uneven_shards[:num_shards]]
    seen = []
    for rank in range(2):
        dataset = image_text_dataset(shards, 32, train=True, mode="exactly_once", rank=rank, world_size=2)
        seen += keys_of(dataset)
    assert Counter(seen) == Counter(shard_keys(uneven_shards[:num_shards]))


def test_resampled_mode_streams_of_2_ranks_x_2_workers_differ_and_are_endless(uneven_shards):
    streams = []
    for rank in range(2):
        dataset = image_text_dataset([str(p) for p in uneven_shards], 32, train=True, mode="resampled",
                                     epoch_length=120, shuffle_buffer=8, rank=rank, world_size=2)
        streams.append(keys_of(dataset))
    assert len(streams[0]) == len(streams[1]) == 120  # more than either rank's 52 or 48 samples: endless
    assert not set(streams[0]) & set(streams[1])  # each rank reads its own shards
    for stream in streams:  # and both workers of each rank contributed distinct samples
        assert len(set(stream)) > 40


def test_unknown_mode_is_rejected(uneven_shards):
    with pytest.raises(ValueError, match="mode='forever'"):
        image_text_dataset(str(uneven_shards[0]), 32, train=True, mode="forever")


def tagged_shards(directory, tag: str, num_shards: int, per_shard: int, helpers) -> list[str]:
    """Shards whose keys start with ``tag``, so a sample's source can be read from its key."""
    from PIL import Image

    image = helpers.image_bytes(Image.new("RGB", (8, 8), (200, 10, 10)))
    paths = []
    for shard in range(num_shards):
        files = []
        for index in range(per_shard):
            files += [(f"{tag}{shard:02d}{index:03d}.png", image), (f"{tag}{shard:02d}{index:03d}.txt", b"red")]
        paths.append(str(helpers.write_tar(directory / f"{tag}-{shard}.tar", files)))
    return paths


def test_sources_are_mixed_by_weight(tmp_path, helpers):
    a = tagged_shards(tmp_path, "a", 4, 10, helpers)
    b = tagged_shards(tmp_path, "b", 2, 10, helpers)
    for weights, expected in (([3, 1], 0.75), ([1, 4], 0.2)):
        dataset = image_text_dataset([a, b], 8, train=True, source_weights=weights, epoch_length=800,
                                     shuffle_buffer=16, rank=1, world_size=2)
        keys = [sample["key"] for sample in dataset]
        from_a = sum(key.startswith("a") for key in keys) / len(keys)
        assert abs(from_a - expected) < 0.06  # 4 standard deviations of a binomial rate at n=800
        assert {key[1:3] for key in keys if key.startswith("a")} == {"01", "03"}  # rank 1's shards of each source
        assert {key[1:3] for key in keys if key.startswith("b")} == {"01"}


def test_exactly_once_mode_reads_every_source_once_whatever_the_weights(tmp_path, helpers):
    a = tagged_shards(tmp_path, "a", 2, 5, helpers)
    b = tagged_shards(tmp_path, "b", 1, 5, helpers)
    dataset = image_text_dataset([a, b], 8, train=False, source_weights=[1, 9])
    assert sorted(s["key"] for s in dataset) == sorted([f"a{s:02d}{i:03d}" for s in range(2) for i in range(5)]
                                                       + [f"b00{i:03d}" for i in range(5)])


def test_weights_must_match_the_sources(tmp_path, helpers):
    a = tagged_shards(tmp_path, "a", 1, 2, helpers)
    with pytest.raises(ValueError, match="2 weight.* for 1 shard source"):
        image_text_dataset([a], 8, train=True, source_weights=[1, 2])
    with pytest.raises(ValueError, match="positive sum"):
        image_text_dataset([a, a], 8, train=True, source_weights=[0, 0])
