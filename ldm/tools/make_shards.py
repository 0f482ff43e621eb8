"""Turn a folder of images with sidecar captions, or a CSV of paths and captions, into WebDataset shards.

    python -m ldm.tools.make_shards --images-dir photos/ --out-dir shards/ --samples-per-shard 10000
    python -m ldm.tools.make_shards --csv captions.csv --path-column file --caption-column text --out-dir shards/

Output in img2dataset's layout: ``OUT/00000.tar, 00001.tar, ...``, each sample ``KEY.jpg|png|webp``
(the original bytes; other formats re-encoded as JPEG), ``KEY.txt`` (caption) and ``KEY.json``
(key, caption, status, width, height, original_width, original_height, url = the source path, any
sidecar ``NAME.json`` fields or other CSV columns), KEY = 5-digit shard index + index in the shard.
Folder mode: ``NAME.jpg`` takes its caption from ``NAME.txt`` beside it. Images that cannot be read
and images without a caption are skipped and counted. Parquet input is read with pyarrow.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from ldm.data.image_shards import folder_records, table_records, write_shards
from ldm.tools.cli import ToolParser, add_overwrite_argument, positive_int, run_cli


def read_table(path: Path) -> list[dict]:
    """Rows of a CSV (header line) or Parquet file as dicts."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError as error:
            raise SystemExit(f"{path} is Parquet, which needs pyarrow: pip install pyarrow, or give a CSV") from error
        return parquet.read_table(path).to_pylist()
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def main(argv: list[str] | None = None) -> dict:
    parser = ToolParser(prog="python -m ldm.tools.make_shards", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images-dir", help="a folder of images with NAME.txt captions beside them")
    source.add_argument("--csv", help="a CSV (or .parquet) file with image paths and captions")
    parser.add_argument("--path-column", default="path")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--samples-per-shard", type=positive_int, default=10_000)
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    if args.images_dir:
        if not Path(args.images_dir).is_dir():
            raise FileNotFoundError(f"--images-dir {args.images_dir} is not a folder")
        records = folder_records(args.images_dir)
    else:
        table = Path(args.csv)
        if not table.is_file():
            raise FileNotFoundError(f"--csv {table} does not exist")
        rows = read_table(table)
        missing = [f"{name!r} ({option})" for option, name in (("--path-column", args.path_column),
                                                               ("--caption-column", args.caption_column))
                   if rows and name not in rows[0]]
        if missing:
            raise ValueError(f"--csv {table} has no column {' and no column '.join(missing)}; set --path-column and "
                             f"--caption-column to two of its columns: {', '.join(map(str, rows[0]))}")
        records = table_records(rows, table.parent, args.path_column, args.caption_column)
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise NotADirectoryError(f"--out-dir {args.out_dir} is a file, not a folder")
    summary = write_shards(records, args.out_dir, args.samples_per_shard, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    if summary["samples"] == 0:
        raise ValueError(f"no sample was written ({summary['skipped'] or 'no input'}): check the captions and "
                         "image paths")
    return summary


if __name__ == "__main__":
    run_cli(main)
