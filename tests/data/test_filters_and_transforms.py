"""Metadata filters (off by default, each counted), caption choice, flips and draft-mode JPEG decoding."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.filters import MetadataFilters
from ldm.data.shards import image_text_dataset
from ldm.data.skips import SkipCounter
from ldm.data.transforms import decode_rgb, open_image, resize_and_crop

# (key, JSON metadata, caption): each sample fails exactly the filter its key names.
SAMPLES = [
    ("good", {"original_width": 64, "original_height": 48, "aesthetic": 6.0, "pwatermark": 0.1, "punsafe": 0.0},
     "a good caption"),
    ("narrow", {"original_width": 20, "original_height": 48}, "a narrow image"),
    ("short", {"original_width": 64, "original_height": 10}, "a short image"),
    ("ugly", {"aesthetic": 4.0}, "an ugly image"),
    ("marked", {"pwatermark": 0.9}, "a watermarked image"),
    ("unsafe", {"punsafe": 0.7}, "an unsafe image"),
    ("terse", {}, "ab"),
    ("verbose", {}, "x" * 300),
    ("unscored", {"aesthetic": None}, "no scores at all"),  # the scored filters cannot judge it: kept
    ("tiny_header", {}, "its size is only in the image header"),  # 8x8 image, no size in JSON
]

STRICT = MetadataFilters(min_width=32, min_height=32, min_aesthetic=5.0, max_pwatermark=0.5, max_punsafe=0.5,
                         min_caption_length=3, max_caption_length=200)


@pytest.fixture()
def metadata_shard(tmp_path, helpers):
    files = []
    for key, metadata, caption in SAMPLES:
        size = (8, 8) if key == "tiny_header" else (64, 48)
        files += [(f"{key}.png", helpers.image_bytes(Image.new("RGB", size, (0, 128, 0)))),
                  (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(metadata).encode())]
    return str(helpers.write_tar(tmp_path / "metadata.tar", files))


def test_every_filter_is_off_by_default(metadata_shard):
    assert len(list(image_text_dataset(metadata_shard, 8, train=False))) == len(SAMPLES)


def test_each_filter_drops_its_samples_and_counts_them(metadata_shard):
    counter = SkipCounter()
    kept = [s["key"] for s in image_text_dataset(metadata_shard, 8, train=False, filters=STRICT, skip_counter=counter)]
    assert kept == ["good", "unscored"]
    assert counter.as_dict() == {"filtered_size": 3, "filtered_aesthetic": 1, "filtered_watermark": 1,
                                 "filtered_unsafe": 1, "filtered_caption_length": 2}


def test_filters_reject_impossible_settings():
    with pytest.raises(ValueError, match="max_punsafe=1.5"):
        MetadataFilters(max_punsafe=1.5)
    with pytest.raises(ValueError, match="min_caption_length=10 exceeds"):
        MetadataFilters(min_caption_length=10, max_caption_length=5)


def test_one_of_several_captions_is_drawn_in_training_and_the_first_in_evaluation(tmp_path, helpers):
    captions = ["first caption", "second caption", "third caption"]
    image = helpers.image_bytes(Image.new("RGB", (8, 8)))
    files = []
    for index in range(60):
        files += [(f"{index:03d}.png", image), (f"{index:03d}.json", json.dumps({"captions": ["", *captions]}).encode()),
                  (f"{index:03d}.txt", b"the txt is not used when a captions list is given")]
    shard = str(helpers.write_tar(tmp_path / "multi.tar", files))
    assert {s["caption"] for s in image_text_dataset(shard, 8, train=False)} == {"first caption"}
    drawn = Counter(s["caption"] for s in image_text_dataset(shard, 8, train=True, epoch_length=300, shuffle_buffer=0))
    assert set(drawn) == set(captions) and min(drawn.values()) > 60  # about 100 each


def test_random_flip_mirrors_about_half_the_training_images(tmp_path, helpers):
    left_red = np.zeros((8, 8, 3), dtype=np.uint8)
    left_red[:, :4, 0] = 255
    files = []
    for index in range(100):
        files += [(f"{index:03d}.png", helpers.image_bytes(Image.fromarray(left_red))), (f"{index:03d}.txt", b"half")]
    shard = str(helpers.write_tar(tmp_path / "flip.tar", files))
    training = list(image_text_dataset(shard, 8, train=True, epoch_length=100, random_flip=True, shuffle_buffer=0))
    flipped = sum(bool(s["image"][0, 0, 7] > 0) for s in training)
    assert 30 <= flipped <= 70
    assert all(s["image"][0, 0, 0] > 0 for s in image_text_dataset(shard, 8, train=False))  # never in evaluation
    assert all(s["image"][0, 0, 0] > 0 for s in image_text_dataset(shard, 8, train=True, epoch_length=50))  # off


def test_random_crop_can_be_turned_off_in_training(tmp_path, helpers):
    files = []
    for index in range(20):
        files += [(f"{index:03d}.png", helpers.image_bytes(Image.new("RGB", (48, 32)))), (f"{index:03d}.txt", b"wide")]
    shard = str(helpers.write_tar(tmp_path / "wide.tar", files))
    samples = image_text_dataset(shard, 16, train=True, epoch_length=20, random_crop=False)
    assert {tuple(s["crop_coords"].tolist()) for s in samples} == {(0, 4)}


def test_large_jpegs_are_decoded_downscaled_but_never_below_the_resolution(tmp_path, helpers):
    gradient = np.linspace(0, 255, 1000, dtype=np.float32)
    pixels = np.stack([np.tile(gradient, (700, 1))] * 3, axis=-1).astype(np.uint8)  # 1000 x 700
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    decoded = decode_rgb(open_image(buffer.getvalue()), 160)
    assert decoded.size == (250, 175)  # libjpeg's 1/4 scale: the short side 175 >= 160, 1/8 (88) would not be
    full = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").resize((250, 175)), dtype=np.float32)
    assert np.abs(np.asarray(decoded, dtype=np.float32) - full).mean() < 3  # the same picture
    shard = helpers.write_tar(tmp_path / "one.tar", [("k.jpg", buffer.getvalue()), ("k.txt", b"a gradient")])
    (sample,) = image_text_dataset(str(shard), 160, train=False)
    assert sample["original_size"].tolist() == [700, 1000] and sample["image"].shape == (3, 160, 160)


@pytest.mark.parametrize("size", [(474, 419), (331, 424), (300, 256), (3000, 2000)])  # the last is box-reduced first
def test_resize_and_crop_gives_the_pixels_of_a_pil_bicubic_resize_then_crop(size):
    rng = np.random.default_rng(0)
    smooth = rng.uniform(0, 255, size=(size[1] // 32 + 2, size[0] // 32 + 2, 3)).astype(np.uint8)
    noisy = np.asarray(Image.fromarray(smooth).resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    image = Image.fromarray((noisy + rng.normal(0, 8, noisy.shape)).clip(0, 255).astype(np.uint8))
    crop, (top, left) = resize_and_crop(image, 256, rng)
    scale = 256 / min(size)
    resized = image.resize((max(256, round(size[0] * scale)), max(256, round(size[1] * scale))), Image.Resampling.BICUBIC)
    expected = np.asarray(resized, dtype=np.int16)[top : top + 256, left : left + 256]
    difference = np.abs(crop.permute(1, 2, 0).numpy().astype(np.int16) - expected)
    assert crop.shape == (3, 256, 256) and crop.dtype == torch.uint8
    assert difference.max() <= 1 and difference.mean() < 0.3


def test_unknown_skip_reasons_are_refused():
    with pytest.raises(ValueError, match="skip reason 'oops'"):
        SkipCounter().add("oops")
