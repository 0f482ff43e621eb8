"""The built-in data set: deterministic shards and captions that state the scene."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ldm.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    MARKER_NAME,
    SHAPES,
    caption_for,
    ensure_synthetic_dataset,
    parse_caption,
    render_scene,
    sample_scene_facts,
    shape_coverage,
    write_synthetic_shards,
)

FACTS = ("shape", "colour", "background")


def read_shard(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def test_same_seed_gives_byte_identical_shards_and_another_seed_differs(tmp_path):
    first = write_synthetic_shards(tmp_path / "a", num_samples=40, samples_per_shard=16, seed=5)
    second = write_synthetic_shards(tmp_path / "b", num_samples=40, samples_per_shard=16, seed=5)
    other = write_synthetic_shards(tmp_path / "c", num_samples=40, samples_per_shard=16, seed=6)
    assert [p.name for p in first] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
    assert first[0].read_bytes() != other[0].read_bytes()


def test_shards_follow_the_img2dataset_layout_and_captions_state_the_facts(tmp_path):
    shards = write_synthetic_shards(tmp_path, num_samples=40, samples_per_shard=16, resolution=24, seed=1)
    samples = {k: v for shard in shards for k, v in read_shard(shard).items()}
    assert sorted(samples) == [f"{i:09d}" for i in range(40)]  # shard index * 16 + position
    assert list(read_shard(shards[1]))[0] == "000000016"
    for key, files in samples.items():
        assert set(files) == {"png", "txt", "json"}
        metadata = json.loads(files["json"])
        caption = files["txt"].decode()
        assert metadata["key"] == key and metadata["caption"] == caption
        assert (metadata["width"], metadata["height"]) == (24, 24)
        assert parse_caption(caption) == {fact: metadata[fact] for fact in FACTS}
        assert caption == caption_for(metadata["shape"], metadata["colour"], metadata["background"])
        image = Image.open(io.BytesIO(files["png"]))
        assert image.size == (24, 24) and image.mode == "RGB"
        size, (x, y) = metadata["size"], metadata["centre"]
        assert 0.4 <= size <= 0.75 and size / 2 <= x <= 1 - size / 2 and size / 2 <= y <= 1 - size / 2


def test_every_combination_appears_equally_often_and_sizes_and_positions_vary():
    facts = sample_scene_facts(54 * 4, seed=0, split="train")
    combinations = Counter((f["shape"], f["colour"], f["background"]) for f in facts)
    assert len(combinations) == len(SHAPES) * len(COLOURS) * len(BACKGROUNDS) == 54
    assert set(combinations.values()) == {4}
    sizes = np.array([f["size"] for f in facts])
    assert sizes.min() < 0.45 and sizes.max() > 0.7
    assert sample_scene_facts(10, seed=0, split="val") != facts[:10]


def test_no_shape_colour_is_a_background_colour():
    assert not set(COLOURS.values()) & set(BACKGROUNDS.values())


def test_captions_and_facts_are_inverse():
    for shape in SHAPES:
        for colour in COLOURS:
            for background in BACKGROUNDS:
                caption = caption_for(shape, colour, background)
                assert parse_caption(caption) == {"shape": shape, "colour": colour, "background": background}
    assert caption_for("circle", "red", "white") == "a red circle on a white background"
    for bad in ("a red circle", "a purple circle on a white background", "a red cube on a white background", ""):
        with pytest.raises(ValueError):
            parse_caption(bad)
    with pytest.raises(ValueError, match="colour='purple'"):
        caption_for("circle", "purple", "white")


def test_rendered_shapes_have_the_expected_area_and_antialiased_edges():
    """Coverage area matches the geometry (square s^2, circle pi s^2/4, triangle s^2/2) to 1 %."""
    resolution, size = 64, 0.5
    side = size * resolution
    expected = {"square": side**2, "circle": np.pi * side**2 / 4, "triangle": side**2 / 2}
    for shape, area in expected.items():
        coverage = shape_coverage(shape, size, (0.51, 0.47), resolution)
        assert abs(coverage.sum() - area) / area < 0.01
        partial = ((coverage > 0) & (coverage < 1)).sum()
        assert partial > 0  # edges are blended, not aliased
    image = np.asarray(render_scene("circle", "red", "black", size, (0.5, 0.5), resolution))
    edge_values = set(image[..., 0].ravel().tolist()) - {0, 255}
    assert edge_values  # intermediate reds on the rim


@pytest.mark.whole_machine
def test_ensure_synthetic_dataset_generates_once_then_reuses(tmp_path):
    started = time.perf_counter()
    train, val = ensure_synthetic_dataset(tmp_path, num_train=96, num_val=20, samples_per_shard=32, seed=2)
    seconds = time.perf_counter() - started
    directory = tmp_path / "synthetic-32px-2"
    assert train == str(directory / "train-{000000..000002}.tar")
    assert val == str(directory / "val-{000000..000000}.tar")
    assert sorted(p.name for p in directory.iterdir()) == [
        MARKER_NAME, "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar",
    ]
    assert json.loads((directory / MARKER_NAME).read_text())["num_train"] == 96
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert seconds < 10
    stamp = (directory / "train-000000.tar").stat().st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path, num_train=96, num_val=20, samples_per_shard=32, seed=2) == (train, val)
    assert (directory / "train-000000.tar").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_ensure_synthetic_dataset_replaces_an_incomplete_or_different_set(tmp_path):
    directory = tmp_path / "synthetic-32px-0"
    directory.mkdir()
    (directory / "train-000000.tar").write_bytes(b"half written")  # a crash before the marker
    train, _ = ensure_synthetic_dataset(tmp_path, num_train=32, num_val=8, samples_per_shard=32)
    assert tarfile.is_tarfile(directory / "train-000000.tar")
    train, _ = ensure_synthetic_dataset(tmp_path, num_train=64, num_val=8, samples_per_shard=32)
    assert train.endswith("train-{000000..000001}.tar")
    assert len(read_shard(directory / "train-000001.tar")) == 32


def test_invalid_arguments_are_rejected_with_the_value_named(tmp_path):
    with pytest.raises(ValueError, match="resolution=4"):
        write_synthetic_shards(tmp_path, num_samples=4, resolution=4)
    with pytest.raises(ValueError, match="num_samples=0"):
        write_synthetic_shards(tmp_path, num_samples=0)
    with pytest.raises(ValueError, match="shape='hexagon'"):
        render_scene("hexagon", "red", "white", 0.5, (0.5, 0.5))


MULTI_ASPECT = [[32, 32], [32, 64], [64, 32]]


def test_multi_aspect_shards_hold_each_size_with_the_shape_in_the_half_its_caption_names(tmp_path):
    (path,) = write_synthetic_shards(tmp_path, num_samples=162, samples_per_shard=162, sizes=MULTI_ASPECT, seed=4)
    sizes, positions = Counter(), Counter()
    for sample in read_shard(path).values():
        metadata = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["png"]))
        assert (image.height, image.width) == (metadata["height"], metadata["width"])
        assert (metadata["original_height"], metadata["original_width"]) == (image.height, image.width)
        facts = parse_caption(sample["txt"].decode())
        assert facts.get("position") == metadata.get("position")
        sizes[image.height, image.width] += 1
        positions[facts.get("position")] += 1
        coverage = shape_coverage(metadata["shape"], metadata["size"], metadata["centre"], (image.height, image.width))
        assert coverage.sum() > 0.1 * image.height * image.width * metadata["size"] ** 2  # drawn, inside the image
        if image.width > image.height:  # all of the shape in the captioned half
            half = slice(0, image.width // 2) if facts["position"] == "left" else slice(image.width // 2, None)
            assert coverage[:, half].sum() == pytest.approx(coverage.sum())
        elif image.height > image.width:
            half = slice(0, image.height // 2) if facts["position"] == "top" else slice(image.height // 2, None)
            assert coverage[half].sum() == pytest.approx(coverage.sum())
        else:
            assert "position" not in facts and "position" not in metadata
    assert set(sizes.values()) == {54}  # one block: every (shape, colour, background) once at each size
    assert set(positions) == {None, "left", "right", "top", "bottom"}


def test_multi_aspect_set_lives_in_its_own_folder_and_leaves_the_square_set_alone(tmp_path):
    square = ensure_synthetic_dataset(tmp_path, num_train=32, num_val=8, samples_per_shard=32)
    before = {p.name: p.read_bytes() for p in (tmp_path / "synthetic-32px-0").iterdir()}
    multi = ensure_synthetic_dataset(tmp_path, num_train=32, num_val=8, samples_per_shard=32, sizes=MULTI_ASPECT)
    assert "synthetic-32x32-32x64-64x32-0" in multi[0] and "synthetic-32px-0" in square[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "synthetic-32px-0").iterdir()} == before
    assert json.loads((tmp_path / "synthetic-32x32-32x64-64x32-0" / MARKER_NAME).read_text())["sizes"] == MULTI_ASPECT


def test_position_captions_round_trip_and_bad_sizes_are_refused_naming_the_key():
    caption = caption_for("circle", "red", "white", "left")
    assert caption == "a red circle on the left of a white background"
    assert parse_caption(caption) == {"shape": "circle", "colour": "red", "background": "white", "position": "left"}
    with pytest.raises(ValueError, match="position"):
        parse_caption("a red circle on the middle of a white background")
    from ldm.data.synthetic import SyntheticSet

    for sizes, message in (([[32, 40]], "too close to square"), ([[4, 32]], "too small"), ([], "distinct"),
                           ([[32, 64], [32, 64]], "distinct")):
        with pytest.raises(ValueError, match=rf"data\.synthetic\.sizes.*{message}"):
            SyntheticSet(data_dir="x", sizes=sizes)
