"""Reading precomputed latent shards: the demo's training stream, now and as it read before.

The demo trains on the built-in set's VAE posteriors and text states (``data=demo_latents``), read in the
training process itself (no worker: the step needs both cores), so every millisecond the stream spends on a
batch is a millisecond the U-Net step waits. Two arms over the same samples, alternating passes, medians:

- **now**: shards as ``ldm.tools.precompute_latents`` writes them (integer member times: plain ustar headers),
  read through the header index (``tar_index``: a seek per file) with ``.npy`` headers parsed once;
- **before**: the same shards rewritten as the tool wrote them before (a float member time, which makes
  tarfile add a pax header to every member), read by tarfile (``read_tar_samples``) with ``numpy.load`` on
  every array.

Each pass builds the demo's training stream (``LatentTextDataset``, resampled, shuffle buffer 1000, batch 32,
caption dropout) and times ``--batches`` batches after 10 warm-up batches.

    python benchmarks/latent_reading.py [--batches 100] [--passes 5] [--latents data/demo-latents]

Writes benchmarks/results/latent_reading.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, machine_info  # noqa: E402
from ldm.data import latents as latents_module  # noqa: E402
from ldm.data import stream as stream_module  # noqa: E402
from ldm.data import tars  # noqa: E402
from ldm.data.latents import LatentTextDataset  # noqa: E402
from ldm.tools import precompute_latents  # noqa: E402

BATCH_SIZE = 32


def pax_copy(source: Path, target: Path) -> None:
    """``source`` rewritten member by member with a float modification time, as the tool wrote it before."""
    with tarfile.open(source) as reader, tarfile.open(target, "w") as writer:
        for index, member in enumerate(reader.getmembers()):
            data = reader.extractfile(member).read()
            member.mtime = 1.7e9 + index / 3
            writer.addfile(member, io.BytesIO(data))


@contextmanager
def reading_as_before():
    """tarfile for every shard and numpy's own .npy reader for every array."""
    def tarfile_samples(url, counter):
        return tars.read_tar_samples(url, counter)

    def numpy_load(data):
        return np.load(io.BytesIO(data), allow_pickle=False)

    with mock.patch.object(stream_module, "shard_samples", tarfile_samples), \
            mock.patch.object(latents_module, "load_npy", numpy_load):
        yield


def seconds_per_batch(shards: list[str], batches: int) -> float:
    stream = iter(LatentTextDataset(shards, train=True, use_text_states=True, rank=0, world_size=1,
                                    batch_size=BATCH_SIZE, drop_last=True, shuffle_buffer=1000,
                                    caption_dropout_prob=0.1, epoch_length=10**6))
    for _ in range(10):
        next(stream)
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return (time.perf_counter() - started) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--latents", default=str(ROOT / "data/demo-latents"),
                        help="the demo's latent shards (make demo writes them); made here with random weights if absent")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/latent_reading.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        latents = Path(args.latents)
        if not (latents / ".complete").exists():  # the speed of reading does not depend on the weights
            latents = work / "now"
            precompute_latents.main(["--builtin", str(work / "data"), "--out-dir", str(latents), "--resolution",
                                     "32", "--vae", "configs/model/vae/tiny.yaml",
                                     "--text-encoder", "configs/model/text_encoder/tiny.yaml"])
        now = sorted(str(path) for path in latents.glob("train-*.tar"))
        (work / "before").mkdir()
        before = []
        for path in now:
            pax_copy(Path(path), work / "before" / Path(path).name)
            before.append(str(work / "before" / Path(path).name))
        times: dict[str, list[float]] = {"now": [], "before": []}
        for _ in range(args.passes):
            times["now"].append(seconds_per_batch(now, args.batches))
            with reading_as_before():
                times["before"].append(seconds_per_batch(before, args.batches))

    median = {arm: statistics.median(values) for arm, values in times.items()}
    result = {
        "batch_size": BATCH_SIZE, "batches": args.batches, "passes": args.passes,
        "ms_per_batch": {arm: 1000 * value for arm, value in median.items()},
        "samples_per_s": {arm: BATCH_SIZE / value for arm, value in median.items()},
        "all_ms_per_batch": {arm: [1000 * v for v in values] for arm, values in times.items()},
        "speedup_now_over_before": median["before"] / median["now"],
        "machine": machine_info(),
    }
    print(f"| stream | ms per batch of {BATCH_SIZE} | samples/s |\n|---|---|---|")
    for arm in ("before", "now"):
        print(f"| {arm} | {result['ms_per_batch'][arm]:.1f} | {result['samples_per_s'][arm]:.0f} |")
    print(f"now / before: {result['speedup_now_over_before']:.2f}x faster")
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
