"""The training stream resumed at a saved position yields exactly what the uninterrupted stream yields next."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.datamodule import ShardDataModule
from ldm.data.resume import batches_given_by_each_worker, batches_per_worker
from ldm.data.shards import collate_samples, image_text_dataset
from ldm.data.synthetic import ensure_synthetic_dataset


def test_round_robin_over_workers_that_run_out():
    assert batches_per_worker(47, 2, 8) == [3, 2]  # 24 and 23 samples
    assert batches_given_by_each_worker(5, [3, 2]) == [3, 2]
    assert batches_given_by_each_worker(3, [3, 2]) == [2, 1]
    assert batches_given_by_each_worker(5, [4, 1, 2]) == [2, 1, 2]
    with pytest.raises(ValueError, match="batches_consumed=6"):
        batches_given_by_each_worker(6, [3, 2])


def keys(loader: DataLoader, epochs: int) -> list[list[str]]:
    """Batch keys over ``epochs`` passes of the loader (one pass = one epoch of the stream)."""
    return [batch["key"] for _ in range(epochs) for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_resumed_mid_epoch_continues_the_same_stream(tmp_path, num_workers):
    train_spec, _ = ensure_synthetic_dataset(tmp_path, num_train=96, num_val=8, samples_per_shard=24)
    settings = dict(train_shards=train_spec, resolution=32, batch_size=4, num_workers=num_workers,
                    train_epoch_length=23, shuffle_buffer=8, caption_dropout_prob=0.5, seed=3)
    uninterrupted = ShardDataModule(**settings)
    expected = keys(uninterrupted.train_dataloader(), epochs=3)  # 5 (or 6 with one loader) batches per epoch

    consumed = 7  # inside the second epoch
    saved = ShardDataModule(**settings)
    saved.train_batches_consumed = consumed
    resumed = ShardDataModule(**settings)
    resumed.load_state_dict(saved.state_dict())
    got = keys(resumed.train_dataloader(), epochs=2)
    per_epoch = len(expected) // 3
    assert got[: 2 * per_epoch - consumed] == expected[consumed : 2 * per_epoch]  # the rest of that epoch
    assert got[2 * per_epoch - consumed :] == expected[2 * per_epoch :]  # and the whole next one
