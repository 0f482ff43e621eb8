"""The training stream resumed at a saved position yields exactly what the uninterrupted stream yields next,
without decoding what was consumed; square and bucketed streams, with damaged shards too."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data import stream as stream_module
from ldm.data.datamodule import ShardDataModule
from ldm.data.resume import batches_per_worker, first_worker_after, load_indexed_sample, tar_index
from ldm.data.tars import read_tar_samples
from ldm.data.skips import SkipCounter
from ldm.data.synthetic import ensure_synthetic_dataset

BUCKETS = [[32, 32], [32, 64], [64, 32]]


def test_batches_per_worker_and_the_round_robin_offset():
    assert batches_per_worker(47, 2, 8) == [3, 2]  # 24 and 23 samples
    assert batches_per_worker(47, 0, 8) == [5]
    assert first_worker_after(None, 2) == 0 and first_worker_after(0, 2) == 1 and first_worker_after(1, 2) == 0


def batches(module: ShardDataModule, epochs: int) -> list[dict]:
    """Training batches over ``epochs`` passes of the loader, each seen by the datamodule as a trainer would."""
    loader = module.train_dataloader()
    return [module.on_before_batch_transfer(batch, 0) for _ in range(epochs) for batch in loader]


def summary(batch: dict) -> tuple:
    return (tuple(batch["key"]), tuple(batch["caption"]), tuple(batch["image"].shape), float(batch["image"].sum()),
            tuple(map(tuple, batch["crop_coords"].tolist())), tuple(sorted(batch["skipped"].items())))


def consumed_module(settings: dict, consumed: int) -> ShardDataModule:
    """A datamodule that has given ``consumed`` training batches (over as many epochs as that takes)."""
    module = ShardDataModule(**settings)
    loader = module.train_dataloader()
    while module.train_batches_consumed < consumed:
        for batch in loader:
            module.on_before_batch_transfer(batch, 0)
            if module.train_batches_consumed == consumed:
                break
    return module


@pytest.fixture(scope="module")
def square_spec(tmp_path_factory) -> str:
    train_spec, _ = ensure_synthetic_dataset(tmp_path_factory.mktemp("square"), num_train=96, num_val=8,
                                             samples_per_shard=24)
    return train_spec


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("bucketed", [False, True])
@pytest.mark.parametrize("consumed", [7, 8])
def test_datamodule_resumed_mid_epoch_continues_the_same_stream(square_spec, aspect_shards, monkeypatch,
                                                                num_workers, bucketed, consumed):
    """Resumed inside the second epoch, after an even (7 = 5 + 2) and an odd (8 = 5 + 3) number of its
    batches over 2 workers (3 and 2 batches each): the rest of that epoch and the next one are the same
    batches, pixels, captions and skip counts. Only the queued samples are decoded again."""
    spec = [str(p) for p in aspect_shards] if bucketed else square_spec
    settings = dict(train_shards=spec, resolution=48 if bucketed else 32, batch_size=4, num_workers=num_workers,
                    train_epoch_length=23, shuffle_buffer=8, caption_dropout_prob=0.5, random_flip=True, seed=3,
                    buckets=BUCKETS if bucketed else None)
    expected = [summary(b) for b in batches(ShardDataModule(**settings), epochs=3)]
    per_epoch = len(expected) // 3
    if bucketed:
        assert len({shape for _, _, shape, *_ in expected}) > 1  # several buckets

    saved = consumed_module(settings, consumed)
    state = saved.state_dict()

    decoded = []
    original = stream_module.ShardStream.decode_checked

    def counting(self, raw, rng, counter):
        decoded.append(raw["__key__"])
        return original(self, raw, rng, counter)

    monkeypatch.setattr(stream_module.ShardStream, "decode_checked", counting)
    resumed = ShardDataModule(**settings)
    resumed.load_state_dict(state)
    got = [summary(b) for b in batches(resumed, epochs=2)]
    assert got[: 2 * per_epoch - consumed] == expected[consumed : 2 * per_epoch]  # the rest of that epoch
    assert got[2 * per_epoch - consumed :] == expected[2 * per_epoch :]  # and the whole next one
    if num_workers == 0:  # decoding counted in this process: far less than the consumed samples
        used = sum(len(b[0]) for b in got)
        assert len(decoded) < used + 3 * 4 + 8, (len(decoded), used)


def test_the_header_index_matches_the_tar_reader_and_loads_the_same_bytes(aspect_shards, tmp_path):
    for shard in aspect_shards[:2]:
        index = tar_index(str(shard))
        read = list(read_tar_samples(str(shard), SkipCounter()))
        assert [entry["__key__"] for entry in index] == [raw["__key__"] for raw in read]
        assert all(load_indexed_sample(entry) == raw for entry, raw in zip(index, read))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(aspect_shards[0].read_bytes()[:3000])
    assert tar_index(str(cut)) is None  # damaged: the reader decides what survives
    gzipped = tmp_path / "shard.tar.gz"
    shutil.make_archive(str(tmp_path / "shard"), "gztar", root_dir=tmp_path, base_dir="cut.tar")
    assert tar_index(str(gzipped)) is None and tar_index(str(tmp_path / "missing.tar")) is None


def test_resume_over_damaged_shards_is_exact(aspect_shards, tmp_path, helpers_damage):
    """A corrupt image and a truncated shard among the consumed ones: the walk over them (by header, or by
    the tar reader where the header index cannot vouch) still lands on the same samples and counts."""
    urls = helpers_damage(aspect_shards, tmp_path)
    settings = dict(train_shards=urls, resolution=48, batch_size=4, num_workers=0, train_epoch_length=40,
                    shuffle_buffer=8, caption_dropout_prob=0.2, seed=5, buckets=BUCKETS)
    expected = [summary(b) for b in batches(ShardDataModule(**settings), epochs=2)]
    assert sum(sum(dict(s[5]).values()) for s in expected) > 0
    saved = consumed_module(settings, 6)
    resumed = ShardDataModule(**settings)
    resumed.load_state_dict(saved.state_dict())
    got = [summary(b) for b in batches(resumed, epochs=1)]
    assert len(expected) == 20 and got == expected[6:10]  # the rest of the first epoch (10 batches)


@pytest.fixture
def helpers_damage():
    """Copies of the first 4 aspect shards: one with a corrupt PNG, one cut in the middle."""
    import io
    import tarfile

    def damage(shards, directory):
        urls = []
        for index, shard in enumerate(shards[:4]):
            target = directory / shard.name
            if index == 1:
                with tarfile.open(shard) as source, tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as out:
                    for member in source.getmembers():
                        data = source.extractfile(member).read()
                        if member.name.endswith("5.png"):
                            data = b"\x89PNG\r\n\x1a\n not an image"
                        member.size = len(data)
                        out.addfile(member, io.BytesIO(data))
            elif index == 2:
                target.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
            else:
                shutil.copy(shard, target)
            urls.append(str(target))
        return urls

    return damage
