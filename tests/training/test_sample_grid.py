"""Sample grids show the run's own data: prompts are a seeded choice of the validation captions."""

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ldm.data.datamodule import LatentShardDataModule, ShardDataModule
from ldm.data.latents import latent_sample_files
from ldm.data.synthetic import parse_caption
from ldm.training.sample_grid import SampleGridLogger, choose_prompts

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> str:
    """A tar of ``{"__key__", ext: bytes}`` samples, files grouped by key."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for extension, data in sample.items():
                if extension == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def digit_samples(count: int) -> list[dict[str, bytes]]:
    """``count`` image-caption samples captioned "a handwritten digit N", the ten digits in turn."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (40, 40, 40)).save(buffer, format="PNG")
    return [{"__key__": f"{index:06d}", "png": buffer.getvalue(),
             "txt": f"a handwritten digit {DIGITS[index % 10]}".encode(),
             "json": json.dumps({"width": 32, "height": 32}).encode()} for index in range(count)]


def grid_prompts(datamodule, **options) -> list[str]:
    """The prompts a SampleGridLogger without a prompt list chooses at the setup of a run on ``datamodule``."""
    callback = SampleGridLogger(output_dir="unused", height=32, width=32, **options)
    callback.setup(SimpleNamespace(datamodule=datamodule), None, "fit")
    return callback.prompts


@pytest.fixture
def digit_data(tmp_path) -> ShardDataModule:
    train = write_shard(tmp_path / "train-0.tar", digit_samples(8))
    val = write_shard(tmp_path / "val-0.tar", digit_samples(30))
    return ShardDataModule(train_shards=train, val_shards=val, resolution=32, batch_size=2, num_workers=0,
                           train_epoch_length=8)


def test_a_run_on_its_own_shards_samples_its_own_validation_captions(digit_data):
    prompts = grid_prompts(digit_data, num_prompts=6, seed=0)
    assert len(prompts) == len(set(prompts)) == 6
    assert set(prompts) <= {f"a handwritten digit {digit}" for digit in DIGITS}


def test_the_same_seed_gives_the_same_prompts_and_another_seed_another_order(digit_data):
    assert grid_prompts(digit_data, num_prompts=6, seed=0) == grid_prompts(digit_data, num_prompts=6, seed=0)
    assert grid_prompts(digit_data, num_prompts=6, seed=0) != grid_prompts(digit_data, num_prompts=6, seed=1)


def test_listed_prompts_are_kept_whatever_the_data(digit_data):
    assert grid_prompts(digit_data, prompts=["a red circle on a white background"]) == [
        "a red circle on a white background"]


def test_the_builtin_set_gives_builtin_captions(tmp_path):
    synthetic = dict(data_dir=str(tmp_path), num_train=16, num_val=40, samples_per_shard=16, resolution=32, seed=2)
    datamodule = ShardDataModule(synthetic=synthetic, batch_size=2, num_workers=0, train_epoch_length=8)
    datamodule.prepare_data()
    prompts = grid_prompts(datamodule, num_prompts=18, seed=0)
    assert len(set(prompts)) == 18
    for prompt in prompts:
        parse_caption(prompt)  # raises on anything but a built-in scene caption


def test_latent_shards_give_their_captions(tmp_path):
    samples = [latent_sample_files(f"{i:06d}", torch.zeros(4, 4, 4), torch.ones(4, 4, 4),
                                   f"a handwritten digit {DIGITS[i]}", {}) for i in range(5)]
    shard = write_shard(tmp_path / "latents-0.tar", samples)
    datamodule = LatentShardDataModule(train_shards=shard, val_shards=shard, batch_size=2, num_workers=0,
                                       train_epoch_length=8)
    assert sorted(grid_prompts(datamodule, num_prompts=18)) == sorted(f"a handwritten digit {d}" for d in DIGITS[:5])


def test_no_validation_data_and_no_prompts_is_refused_naming_the_keys(tmp_path):
    train = write_shard(tmp_path / "train-0.tar", digit_samples(8))
    datamodule = ShardDataModule(train_shards=train, batch_size=2, num_workers=0, train_epoch_length=8)
    with pytest.raises(ValueError, match=r"callbacks\.sample_grid\.prompts is null.*data\.val_shards"):
        grid_prompts(datamodule)


def test_choose_prompts_takes_distinct_captions_and_stops_at_what_there_is():
    captions = ["b", "a", "b", "c", "a", ""]
    assert sorted(choose_prompts(captions, 10, seed=3)) == ["a", "b", "c"]
    assert len(choose_prompts(captions, 2, seed=3)) == 2


@pytest.mark.parametrize(("options", "key"), [
    (dict(prompts=[]), "callbacks.sample_grid.prompts"),
    (dict(num_prompts=0), "callbacks.sample_grid.num_prompts"),
    (dict(guidance_scale=float("nan")), "callbacks.sample_grid.guidance_scale"),
    (dict(num_inference_steps=0), "callbacks.sample_grid.num_inference_steps"),
])
def test_bad_options_are_refused_in_one_line_naming_the_key(options, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as error:
        SampleGridLogger(output_dir="unused", height=32, width=32, **options)
    assert "\n" not in str(error.value)


def test_prompts_may_carry_their_own_sizes_and_the_grid_keeps_each_aspect_ratio(tmp_path):
    from ldm.visualization import captioned_grid

    callback = SampleGridLogger(output_dir="unused", height=32, width=32, prompts=["a", "b"], sizes=[[32, 64], [64, 32]])
    assert callback.sizes == [(32, 64), (64, 32)]
    with pytest.raises(ValueError, match=r"callbacks\.sample_grid\.sizes lists 1 .* one per prompt"):
        SampleGridLogger(output_dir="unused", height=32, width=32, prompts=["a", "b"], sizes=[[32, 64]])
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    tall = Image.new("RGB", (32, 64), (0, 0, 255))
    grid = captioned_grid([wide, tall], ["wide", "tall"], columns=2, tile_size=64)
    pixels = grid.load()
    # Each image fills its cell's width or height, not both: the rest of the square cell is padding.
    assert pixels[4 + 32, 4 + 24] == (255, 0, 0) and pixels[4 + 32, 4 + 4] == (255, 255, 255)
    assert pixels[4 + 68 + 32, 4 + 32] == (0, 0, 255) and pixels[4 + 68 + 4, 4 + 32] == (255, 255, 255)


def test_a_grid_size_the_model_cannot_generate_is_refused_at_setup():
    callback = SampleGridLogger(output_dir="unused", height=32, width=32, prompts=["a"], sizes=[[32, 40]])
    module = SimpleNamespace(vae=SimpleNamespace(downsample_factor=4), network=SimpleNamespace(downsample_factor=4))
    with pytest.raises(ValueError, match=r"callbacks\.sample_grid: 32x40 is not a multiple of 16"):
        callback.setup(SimpleNamespace(datamodule=None), module, "fit")
