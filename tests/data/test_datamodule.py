"""ShardDataModule: the built-in set on first use, batches of the documented shape, clear errors."""

from __future__ import annotations

import pytest
import torch

from ldm.data.datamodule import ShardDataModule


def synthetic_module(tmp_path, **overrides) -> ShardDataModule:
    settings = dict(
        resolution=32, batch_size=8, num_workers=0, train_epoch_length=32, shuffle_buffer=16,
        synthetic=dict(data_dir=str(tmp_path), num_train=64, num_val=20, samples_per_shard=16, resolution=32, seed=4),
    )
    return ShardDataModule(**{**settings, **overrides})


def test_the_built_in_set_is_generated_in_prepare_data_and_used(tmp_path):
    module = synthetic_module(tmp_path)
    module.prepare_data()
    assert sorted(p.name for p in (tmp_path / "synthetic-32px-4").glob("*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar", "val-000000.tar",
        "val-000001.tar",
    ]
    module.setup("fit")
    train_batches = list(module.train_dataloader())
    assert len(train_batches) == 4  # train_epoch_length 32 / batch_size 8
    batch = train_batches[0]
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["original_size"].shape == (8, 2) and batch["crop_coords"].shape == (8, 2)
    assert len(batch["caption"]) == 8 and batch["skipped"] == {}
    val_keys = [key for batch in module.val_dataloader() for key in batch["key"]]
    assert sorted(val_keys) == [f"{i:09d}" for i in range(20)]  # every validation sample once


def test_setup_alone_resolves_the_built_in_set_on_other_ranks(tmp_path):
    """Ranks other than 0 skip prepare_data: setup finds (or makes) the same set."""
    synthetic_module(tmp_path).prepare_data()
    other_rank = synthetic_module(tmp_path)
    other_rank.setup("fit")
    assert len(other_rank.train_urls) == 4 and len(other_rank.val_urls) == 2


def test_workers_persist_and_epochs_differ(tmp_path):
    module = synthetic_module(tmp_path, num_workers=2, train_epoch_length=32, batch_size=4)
    module.prepare_data()
    module.setup("fit")
    loader = module.train_dataloader()
    assert loader.persistent_workers
    first = [key for batch in loader for key in batch["key"]]
    second = [key for batch in loader for key in batch["key"]]
    assert len(first) == len(second) == 32 and first != second


def test_explicit_shards_without_a_validation_set(tmp_path):
    synthetic_module(tmp_path).prepare_data()
    pattern = str(tmp_path / "synthetic-32px-4" / "train-{000000..000003}.tar")
    module = ShardDataModule(train_shards=pattern, resolution=16, batch_size=4, num_workers=0, train_epoch_length=8)
    module.setup("fit")
    assert next(iter(module.train_dataloader()))["image"].shape == (4, 3, 16, 16)
    assert module.val_dataloader() == []


def test_missing_shards_name_the_pattern(tmp_path):
    pattern = str(tmp_path / "laion" / "{00000..00009}.tar")
    module = ShardDataModule(train_shards=pattern, num_workers=0, batch_size=4, train_epoch_length=8)
    with pytest.raises(FileNotFoundError, match=r"data.train_shards=.*laion.*no file matched"):
        module.setup("fit")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(resolution=0), "data.resolution=0"),
        (dict(batch_size=0), "data.batch_size=0"),
        (dict(num_workers=-1), "data.num_workers=-1"),
        (dict(caption_dropout_prob=2.0), "data.caption_dropout_prob=2.0"),
        (dict(train_epoch_length=10, batch_size=8, num_workers=2), "at least 16"),
        (dict(synthetic=None), "no training data"),
        (dict(max_skip_rate=float("nan")), "data.max_skip_rate=nan"),
        (dict(synthetic=dict(num_train=8)), "data.synthetic.data_dir is required"),
        (dict(filters=dict(max_punsafe=1.5)), "data.filters.max_punsafe=1.5"),
    ],
)
def test_invalid_arguments_are_rejected_with_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        synthetic_module(tmp_path, **overrides)
