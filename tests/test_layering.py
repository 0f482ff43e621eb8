"""The layering the architecture promises, read from the import statements: model and diffusion code import torch
(and the text towers open_clip) only; inference code imports no training code and neither Lightning nor Hydra."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STANDARD_LIBRARY = set(sys.stdlib_module_names) | {"__future__"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (absolute names; ``from . import x`` does not occur in ldm)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["models", "diffusion"])
def test_model_and_diffusion_code_import_torch_only(package):
    """Besides torch (and open_clip for the text towers) they import their own package and the Conditioning."""
    allowed_third_party = {"torch"} | ({"open_clip"} if package == "models" else set())
    for path in sorted((ROOT / "ldm" / package).glob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert (top in STANDARD_LIBRARY or top in allowed_third_party or name == "ldm.conditioning"
                    or name.startswith(f"ldm.{package}")), f"{path.relative_to(ROOT)} imports {name}"


def test_the_conditioning_contract_imports_torch_only():
    for name in imported_modules(ROOT / "ldm" / "conditioning.py"):
        assert name.split(".")[0] in STANDARD_LIBRARY | {"torch"}, name


def test_inference_code_imports_no_training_code():
    files = [ROOT / "ldm" / "pipeline.py", *sorted((ROOT / "ldm" / "interchange").glob("*.py")),
             ROOT / "ldm" / "tools" / "sample.py", ROOT / "ldm" / "tools" / "export.py", ROOT / "ldm" / "tools" / "cli.py",
             ROOT / "ldm" / "tools" / "posthoc_ema.py"]
    for path in files:
        for name in imported_modules(path):
            assert not name.startswith(("ldm.training", "lightning", "hydra", "omegaconf", "wandb")), \
                f"{path.relative_to(ROOT)} imports {name}"


def library_files(*packages: str) -> list[Path]:
    """The .py files of ``ldm/<package>`` for each package (all of ldm/ when none is named)."""
    folders = [ROOT / "ldm" / package for package in packages] or [ROOT / "ldm"]
    return sorted(path for folder in folders for path in folder.rglob("*.py"))


def test_nothing_outside_the_tools_imports_them():
    """The command-line programs sit on top: library code never imports ``ldm.tools``."""
    for path in library_files():
        if path.is_relative_to(ROOT / "ldm" / "tools"):
            continue
        for name in imported_modules(path):
            assert not name.startswith("ldm.tools"), f"{path.relative_to(ROOT)} imports {name}"


def test_evaluation_imports_no_training_code():
    for path in library_files("evaluation"):
        for name in imported_modules(path):
            assert not name.startswith(("ldm.training", "lightning")), f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize("package", ["data", "interchange"])
def test_data_and_interchange_import_neither_training_nor_tools(package):
    for path in library_files(package):
        for name in imported_modules(path):
            assert not name.startswith(("ldm.training", "ldm.tools")), f"{path.relative_to(ROOT)} imports {name}"


MAX_LINES = 450


def test_no_library_file_is_over_450_lines():
    """Each file has one job; a file past this length holds more than one and is split by job."""
    long_files = {str(path.relative_to(ROOT)): lines for path in library_files()
                  if (lines := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long_files, f"over {MAX_LINES} lines: {long_files}"
