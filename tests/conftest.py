"""Test-wide settings: never touch the network, keep W&B offline, few threads; under pytest-xdist (``make test``
runs a worker per core) one thread per worker, and the groups that keep what a fixture built on one worker
(see docs/testing.md)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# pytest-xdist sets these in each worker (and its subprocesses inherit them).
WORKER_COUNT = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
# With a worker per core, a second intra-op thread per worker only makes the workers fight for the cores
# (and OpenMP threads that wait for a busy core stall): one thread each, in the processes they start too.
if WORKER_COUNT > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


import io  # noqa: E402
import json  # noqa: E402
import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# (height, width) of the images of ``write_aspect_shards``: square, 2:1 wide and tall, 3:2 wide, small (upscaled).
ASPECT_SIZES = ((32, 32), (32, 64), (64, 32), (32, 48), (12, 24))


def write_aspect_shards(directory: Path, num_samples: int, samples_per_shard: int, seed: int = 0,
                        prefix: str = "train") -> list[Path]:
    """Shards of PNGs of several aspect ratios (``ASPECT_SIZES``, drawn at random) with a caption and JSON
    (width, height) each: a smooth random field, so that different crops give different pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(-(-num_samples // samples_per_shard)):
        path = directory / f"{prefix}-{shard:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(shard * samples_per_shard, min(num_samples, (shard + 1) * samples_per_shard)):
                height, width = ASPECT_SIZES[int(rng.integers(len(ASPECT_SIZES)))]
                coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                files = {"png": buffer.getvalue(), "txt": f"image {index} of {height}x{width}".encode(),
                         "json": json.dumps({"width": width, "height": height}).encode()}
                for extension, data in files.items():
                    info = tarfile.TarInfo(f"{index:09d}.{extension}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def aspect_shards(tmp_path_factory) -> list[Path]:
    """6 shards of 20 images of several aspect ratios (see ``write_aspect_shards``)."""
    return write_aspect_shards(tmp_path_factory.mktemp("aspect"), num_samples=120, samples_per_shard=20, seed=11)


@pytest.fixture(scope="session")
def aspect_shard_writer():
    """``write_aspect_shards``, for tests that need their own set."""
    return write_aspect_shards


# --- Running in parallel -------------------------------------------------------------------------------------
# Tests marked whole_machine (DDP/FSDP ranks, a timed step) run one after another in a group of their own: two
# at once would double the processes on the cores and could pick the same rendezvous port.
# Tests that use one of these fixtures run on one xdist worker, in the order collected (``--dist loadgroup``):
# the fixture is built once, and tests that change what it made (a moved file, a second run in its folder)
# never meet another test using it.
FIXTURE_GROUPS = {
    "trained_run": "trained_run",
    # The notebooks' tiny model takes minutes to train; a second worker would wait for it idle.
    "cache_dir": "notebooks",
}


def pytest_configure(config):
    if WORKER_COUNT > 1:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):
        # Workers take tests in this order as they finish others: the long end-to-end runs first, so that
        # the short tests fill the end and both workers finish together.
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    groups = {}
    for item in items:
        if item.get_closest_marker("xdist_group") is None and (group := xdist_group(item)):
            item.add_marker(pytest.mark.xdist_group(group))
        if (mark := item.get_closest_marker("xdist_group")) is not None:
            groups[item.nodeid] = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
    if hasattr(config, "workerinput") and config.workerinput["workerid"] == "gw0":
        (Path(config.option.basetemp).parent / GROUPS_FILE).write_text(json.dumps(groups))


# pytest 9 keeps a node's id in ``_id``, so xdist 3.8's loadgroup, which appends "@group" to ``_nodeid``, groups
# nothing: the controller's scheduler reads the groups the first worker wrote at collection instead.
GROUPS_FILE = "xdist_groups.json"


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    groups_file = config._tmp_path_factory.getbasetemp() / GROUPS_FILE

    class MarkedGroupScheduling(LoadScopeScheduling):
        """loadgroup: tests with one xdist_group mark run on one worker; the others go one by one."""

        def _split_scope(self, nodeid: str) -> str:
            if not hasattr(self, "_groups"):
                self._groups = json.loads(groups_file.read_text()) if groups_file.is_file() else {}
            return self._groups.get(nodeid, nodeid)

    return MarkedGroupScheduling(config, log)


def xdist_group(item) -> str | None:
    """``whole_machine`` for a test so marked; the group of a test that uses a fixture of ``FIXTURE_GROUPS``;
    else, for a test that uses a module-scoped fixture (a run, a trained classifier, shards), its module's, so that
    the module builds it once."""
    if item.get_closest_marker("whole_machine") is not None:
        return "whole_machine"
    groups = {FIXTURE_GROUPS[name] for name in getattr(item, "fixturenames", ()) if name in FIXTURE_GROUPS}
    if len(groups) > 1:
        raise pytest.UsageError(f"{item.nodeid} uses fixtures of several xdist groups: {sorted(groups)}")
    if groups:
        return groups.pop()
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    if any(defs and defs[-1].scope == "module" for defs in definitions.values()):
        return item.nodeid.split("::")[0]
    return None
