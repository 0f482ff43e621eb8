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
             ROOT / "ldm" / "tools" / "sample.py", ROOT / "ldm" / "tools" / "export.py", ROOT / "ldm" / "tools" / "cli.py"]
    for path in files:
        for name in imported_modules(path):
            assert not name.startswith(("ldm.training", "lightning", "hydra", "omegaconf", "wandb")), \
                f"{path.relative_to(ROOT)} imports {name}"
