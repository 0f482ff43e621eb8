"""Fetch the wheels the GPU machine lacks into .whl/ (git-ignored; it travels with the working tree).

The GPU machine has Python 3.12, torch, Lightning, transformers, safetensors, timm, peft, pytest, scipy and
matplotlib, and no network. This downloads, for CPython 3.12 on manylinux x86-64 (or pure Python), the
packages ldm and its checks import beyond those, at the versions installed here, without their
dependencies; a package published only as source (antlr4-python3-runtime) is built into a pure-Python wheel.
``benchmarks/gpu_check.py`` installs them with ``pip install --no-index --no-deps --target``.

Then it proves the set: a ``pip install --dry-run`` for Python 3.12 of these packages, with .whl/ as the
first source, lists what else would be installed; every such package must be one the GPU machine has.

    python benchmarks/gpu_wheels.py              # make gpu-wheels
    python benchmarks/gpu_wheels.py --check-only # re-check an existing .whl/
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
LIMIT_MIB = 64  # what travels with the working tree to the GPU machine, in all
# What the GPU machine lacks (and the packages those need that it may lack), at this machine's versions.
PACKAGES = ["hydra-core", "omegaconf", "antlr4-python3-runtime", "open_clip_torch", "ftfy", "wcwidth", "webdataset",
            "braceexpand", "diffusers", "importlib_metadata", "zipp", "lazy-importer"]
# Packages the GPU machine has (its torch stack and their dependencies): a dry-run install may pull these.
GPU_MACHINE_HAS = {"torch", "torchvision", "lightning", "pytorch-lightning", "lightning-utilities", "torchmetrics",
                   "transformers", "tokenizers", "huggingface-hub", "hf-xet", "httpx", "httpcore", "h11", "anyio",
                   "idna", "certifi", "sniffio", "safetensors", "timm", "peft", "accelerate", "pytest", "scipy",
                   "matplotlib", "numpy", "pillow", "pyyaml", "packaging", "regex", "tqdm", "filelock", "fsspec",
                   "requests", "urllib3", "charset-normalizer", "typing-extensions", "sympy", "mpmath", "networkx",
                   "jinja2", "markupsafe", "psutil", "setuptools", "typer", "typer-slim", "click", "shellingham",
                   "rich", "markdown-it-py", "mdurl", "pygments", "aiohttp"}
# torch's CUDA libraries and compiler come with the GPU machine's torch; the resolver also picks the newest
# huggingface-hub, whose own dependencies differ by version: the machine's hub comes with its own.
GPU_MACHINE_HAS_PREFIXES = ("nvidia-", "triton", "cuda-")
HUB_DEPENDENCIES = {"httpx2", "httpcore2", "truststore"}
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "--platform", "any"]


def pinned() -> list[str]:
    """``name==version`` of each package, at the version installed here."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in PACKAGES]


def pip(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *arguments], capture_output=True, text=True)


def fetch(requirements: list[str]) -> None:
    """Download each requirement's wheel; build the pure-Python wheel of one published only as source."""
    WHEELS.mkdir(exist_ok=True)
    for requirement in requirements:
        result = pip("download", "--quiet", "--no-deps", "--dest", str(WHEELS), *PLATFORM, requirement)
        if result.returncode != 0:
            built = pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(WHEELS), requirement)
            names = [wheel.name for wheel in WHEELS.glob("*.whl")]
            if built.returncode != 0 or not any("py3-none-any" in name or "py2.py3-none-any" in name for name in names):
                raise SystemExit(f"{requirement}: no wheel for Python 3.12 manylinux x86-64 and no pure-Python build:\n"
                                 f"{result.stderr[-1500:]}\n{built.stderr[-1500:]}")
        print(f"fetched {requirement}")


def check(requirements: list[str]) -> dict:
    """What a Python 3.12 install of ``requirements`` with .whl/ first would add beyond .whl/; must all be
    packages the GPU machine has. Also the total size against the carry limit."""
    size_mib = sum(wheel.stat().st_size for wheel in WHEELS.glob("*.whl")) / 2**20
    if size_mib > LIMIT_MIB:
        raise SystemExit(f".whl/ holds {size_mib:.1f} MiB; the GPU machine takes at most {LIMIT_MIB} MiB in all")
    with tempfile.TemporaryDirectory() as target:
        report_path = Path(target) / "report.json"
        result = pip("install", "--dry-run", "--quiet", "--ignore-installed", "--target", str(Path(target) / "site"),
                     "--find-links", str(WHEELS), *PLATFORM, "--report", str(report_path), *requirements)
        if result.returncode != 0:
            raise SystemExit(f"the wheel set does not resolve for Python 3.12:\n{result.stderr[-3000:]}")
        report = json.loads(report_path.read_text())
    ours = {canonical(wheel.name.split("-")[0]) for wheel in WHEELS.glob("*.whl")}
    pulled = sorted({canonical(item["metadata"]["name"]) for item in report["install"]} - ours)
    unknown = [name for name in pulled if name not in GPU_MACHINE_HAS | HUB_DEPENDENCIES
               and not name.startswith(GPU_MACHINE_HAS_PREFIXES)]
    if unknown:
        raise SystemExit(f"a Python 3.12 install would also need {unknown}, which the GPU machine may lack; "
                         f"add them to PACKAGES in {Path(__file__).name}")
    return {"wheels": sorted(wheel.name for wheel in WHEELS.glob("*.whl")), "size_mib": round(size_mib, 1),
            "resolved_with_gpu_machine_packages": pulled}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-only", action="store_true", help="check .whl/ without downloading")
    args = parser.parse_args()
    requirements = pinned()
    if not args.check_only:
        fetch(requirements)
    result = check(requirements)
    print(f"{len(result['wheels'])} wheels, {result['size_mib']} MiB in {WHEELS}; a Python 3.12 install of them "
          f"resolves, also taking from the GPU machine: {', '.join(result['resolved_with_gpu_machine_packages'])}")


if __name__ == "__main__":
    main()
