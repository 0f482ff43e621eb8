"""Every notebook in notebooks/ runs top to bottom in a fresh kernel and draws its figures again; the stored
notebooks are their sources' code with outputs, small, and read as lessons (an opening, a summary)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tests.shared import shared_folder

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
NAMES = sorted(path.stem for path in (NOTEBOOKS / "sources").glob("*.py"))
# Smaller runs where a notebook's cost scales with a parameter; the figures stay the same.
SMALLER = {
    "02_training_the_noise_predictor": {"train_steps": 20},
    "03_reverse_process": {"num_inference_steps": 10},
    "05_inside_the_unet": {"num_measured": 108},
    "06_data_and_evaluation": {"num_generated": 64},
}
MAX_CELL_LINES = 50  # about one screen
IMAGE_TYPES = ("image/png", "image/gif", "image/jpeg")


def load_build_module():
    spec = importlib.util.spec_from_file_location("notebook_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build_module()


def with_parameters(notebook: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
    """Add a cell setting ``values`` after the cell tagged "parameters" (as papermill injects them)."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{key} = {value!r}" for key, value in values.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return notebook


def image_counts(notebook: nbformat.NotebookNode) -> list[int]:
    """Images shown by each code cell of the notebook's own (not injected) cells."""
    return [sum(any(kind in output.get("data", {}) for kind in IMAGE_TYPES) for output in cell.get("outputs", []))
            for cell in notebook.cells
            if cell.cell_type == "code" and "injected-parameters" not in cell.metadata.get("tags", [])]


def text_output(notebook: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))


def train_tiny_model(folder: Path) -> None:
    """``tiny_model(folder)`` and the built-in set, made as a notebook's kernel makes them (its working directory,
    its threads), so that the notebooks, run in parallel, only read the folder."""
    script = ("import sys; from tiny_model import tiny_model; from ldm.data.synthetic import ensure_synthetic_dataset; "
              "tiny_model(sys.argv[1]); ensure_synthetic_dataset(sys.argv[1] + '/data')")
    environment = {"OMP_NUM_THREADS": build.KERNEL_THREADS, **os.environ}
    completed = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=NOTEBOOKS, env=environment,
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data set and one tiny model for all notebooks of the session, trained once for every xdist worker."""
    spec = importlib.util.spec_from_file_location("notebook_tiny_model", NOTEBOOKS / "tiny_model.py")
    tiny_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_model)
    settings = {"vae_steps": tiny_model.VAE_STEPS, "unet_steps": tiny_model.UNET_STEPS,
                "short_run": tiny_model.SHORT_RUN, "kernel_threads": build.KERNEL_THREADS}
    return shared_folder(tmp_path_factory, "notebook-cache", settings, train_tiny_model)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_without_error_and_draws_its_figures(name, cache_dir):
    notebook = build.notebook_from_source(NOTEBOOKS / "sources" / f"{name}.py")
    if any("parameters" in cell.metadata.get("tags", []) for cell in notebook.cells):
        notebook = with_parameters(notebook, {"cache_dir": str(cache_dir), **SMALLER.get(name, {})})
    executed = build.execute(notebook)  # raises CellExecutionError, naming the cell, if any cell fails
    errors = [output for cell in executed.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors
    stored = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    expected = image_counts(stored)
    assert sum(expected) > 0
    assert image_counts(executed) == expected  # every figure of the stored run, drawn by the same cell
    if name == "05_inside_the_unet":
        match = re.search(r"colour-word attention on the shape: ([\d.]+); shape's area share: ([\d.]+) "
                          r"\([\d.]+x, ([-\d.]+) standard errors above\)", text_output(executed))
        assert match, "notebook 5 no longer prints its attention measurement"
        colour_share, area_share, standard_errors = map(float, match.groups())
        # The head is chosen on other images than it is measured on, so a head reading the word alike
        # everywhere scores the area share up to sampling noise: 3 standard errors is a one-sided p of
        # about 0.001 that the localisation is noise.
        assert colour_share > area_share and standard_errors > 3, (colour_share, area_share, standard_errors)


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebook_is_its_source_executed_small_and_readable(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    assert path.stat().st_size < 1_000_000, f"{path.name} is {path.stat().st_size} bytes; keep figures small"
    stored = nbformat.read(path, as_version=4)
    source = build.notebook_from_source(NOTEBOOKS / "sources" / f"{name}.py")
    assert [(c.cell_type, c.source) for c in stored.cells] == [(c.cell_type, c.source) for c in source.cells], (
        f"{path.name} differs from sources/{name}.py: run python notebooks/build.py {name}")
    code = [cell for cell in stored.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), f"{path.name} is stored unexecuted"
    assert stored.cells[0].cell_type == "markdown" and stored.cells[0].source.startswith("# ")
    assert stored.cells[-1].cell_type == "markdown" and "## What you should now know" in stored.cells[-1].source
    for cell in stored.cells:
        assert len(cell.source.splitlines()) <= MAX_CELL_LINES, f"a cell of {path.name} is longer than a screen"
    assert "from tiny_model import" in "".join(c.source for c in code) or name == "01_forward_process"
