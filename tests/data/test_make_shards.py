"""make_shards: a folder with sidecar captions, a CSV or a Parquet file becomes img2dataset-layout shards the pipeline reads."""

from __future__ import annotations

import csv
import json
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ldm.data.shards import image_text_dataset
from ldm.tools import make_shards


def photo(path, size, colour=(10, 200, 30), format=None):
    Image.new("RGB", size, colour).save(path, format=format)
    return path


def test_a_folder_with_sidecar_captions_becomes_shards(tmp_path):
    source = tmp_path / "photos"
    (source / "sub").mkdir(parents=True)
    for index in range(5):
        photo(source / f"img{index}.jpg", (40 + index, 30))
        (source / f"img{index}.txt").write_text(f"photo number {index}\n")
    photo(source / "sub" / "deep.bmp", (20, 20), format="BMP")  # re-encoded as JPEG
    (source / "sub" / "deep.txt").write_text("a bitmap")
    (source / "sub" / "deep.json").write_text(json.dumps({"aesthetic": 6.5}))
    photo(source / "uncaptioned.png", (8, 8))
    (source / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (source / "broken.txt").write_text("a broken file")

    summary = make_shards.main(["--images-dir", str(source), "--out-dir", str(tmp_path / "out"),
                                "--samples-per-shard", "4"])
    assert summary["samples"] == 6 and summary["shards"] == 2
    assert summary["skipped"] == {"missing_caption": 1, "corrupt_image": 1}
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == ["000000000.jpg", "000000000.json", "000000000.txt"]
    samples = list(image_text_dataset(summary["shard_spec"], 16, train=False))
    assert [s["key"] for s in samples] == ["000000000", "000000001", "000000002", "000000003", "000010000",
                                           "000010001"]
    captions = {s["caption"] for s in samples}
    assert captions == {f"photo number {i}" for i in range(5)} | {"a bitmap"}
    by_caption = {s["caption"]: s for s in samples}
    assert by_caption["photo number 4"]["original_size"].tolist() == [30, 44]


def test_metadata_is_written_in_img2dataset_fields_with_extra_fields_kept(tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    photo(source / "a.png", (64, 48))
    (source / "a.txt").write_text("a png")
    (source / "a.json").write_text(json.dumps({"punsafe": 0.01}))
    summary = make_shards.main(["--images-dir", str(source), "--out-dir", str(tmp_path / "out")])
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        metadata = json.loads(tar.extractfile("000000000.json").read())
        png = tar.extractfile("000000000.png").read()
    assert png == (source / "a.png").read_bytes()  # original bytes, not re-encoded
    assert metadata["original_width"] == 64 and metadata["original_height"] == 48 and metadata["punsafe"] == 0.01
    assert metadata["caption"] == "a png" and metadata["status"] == "success" and summary["shards"] == 1


def test_a_csv_of_paths_and_captions_becomes_shards_with_its_other_columns(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for index in range(3):
        pixels = np.full((16, 24, 3), index * 60, dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{index}.webp")
        rows.append({"file": f"images/{index}.webp", "text": f"grey level {index}", "aesthetic": str(5 + index)})
    rows.append({"file": "images/missing.webp", "text": "gone", "aesthetic": "9"})
    with (tmp_path / "list.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "text", "aesthetic"])
        writer.writeheader()
        writer.writerows(rows)
    summary = make_shards.main(["--csv", str(tmp_path / "list.csv"), "--path-column", "file", "--caption-column",
                                "text", "--out-dir", str(tmp_path / "out")])
    assert summary["samples"] == 3 and summary["skipped"] == {"missing_image": 1}
    samples = list(image_text_dataset(summary["shard_spec"], 16, train=False))
    assert [s["caption"] for s in samples] == ["grey level 0", "grey level 1", "grey level 2"]
    with pytest.raises(ValueError, match="set --path-column"):
        make_shards.main(["--csv", str(tmp_path / "list.csv"), "--out-dir", str(tmp_path / "out2")])


def test_a_parquet_of_paths_and_captions_becomes_shards(tmp_path):
    (tmp_path / "images").mkdir()
    for index in range(3):
        photo(tmp_path / "images" / f"{index}.jpg", (32, 24), colour=(index * 80, 0, 0))
    table = pa.table({"url_path": [f"images/{i}.jpg" for i in range(3)] + [None],
                      "TEXT": ["red 0", "red 1", None, "no path"], "punsafe": [0.1, 0.2, 0.3, 0.4]})
    pq.write_table(table, tmp_path / "list.parquet")
    summary = make_shards.main(["--csv", str(tmp_path / "list.parquet"), "--path-column", "url_path",
                                "--caption-column", "TEXT", "--out-dir", str(tmp_path / "out")])
    assert summary["samples"] == 2 and summary["skipped"] == {"missing_caption": 1, "missing_image": 1}
    samples = list(image_text_dataset(summary["shard_spec"], 16, train=False))
    assert [s["caption"] for s in samples] == ["red 0", "red 1"]
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:  # the other columns travel in the JSON
        assert json.loads(tar.extractfile("000000001.json").read())["punsafe"] == 0.2


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    (tmp_path / "list.parquet").write_bytes(b"PAR1")
    with pytest.raises(SystemExit, match="needs pyarrow"):
        make_shards.main(["--csv", str(tmp_path / "list.parquet"), "--out-dir", str(tmp_path / "out")])
