"""Build the notebooks: each ``sources/NAME.py`` (jupytext percent format) becomes ``NAME.ipynb``, executed
top to bottom here, so the stored notebook carries its outputs.

    python notebooks/build.py                  # every notebook
    python notebooks/build.py 05_inside_the_unet   # one (name without .py)

Edit the sources, never the .ipynb files: ``tests/notebooks`` checks that the two agree.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent
SOURCES = NOTEBOOKS / "sources"
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}
# The notebooks' models are tiny: one intra-op thread per kernel costs less CPU time per training step and
# sampling call than two, whose synchronisation outweighs the split work (and a loaded machine has no idle core).
KERNEL_THREADS = "1"


def notebook_from_source(source: Path) -> nbformat.NotebookNode:
    """The unexecuted notebook of a percent-format source, with the Python 3 kernel."""
    notebook = jupytext.read(source)
    notebook.metadata = {"kernelspec": KERNEL, "language_info": {"name": "python"}}
    return notebook


def execute(notebook: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel whose working directory is ``notebooks/``, with ``KERNEL_THREADS``
    torch threads unless ``OMP_NUM_THREADS`` is set; raises on a failing cell."""
    environment = {"OMP_NUM_THREADS": KERNEL_THREADS, **os.environ}
    NotebookClient(notebook, timeout=timeout, kernel_name=KERNEL["name"],
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute(env=environment)
    for cell in notebook.cells:  # run-specific noise that would change the file at every build
        cell.metadata.pop("execution", None)
    return notebook


def build(name: str) -> float:
    """Execute ``sources/name.py`` and write ``name.ipynb``; returns the seconds it took."""
    started = time.perf_counter()
    notebook = execute(notebook_from_source(SOURCES / f"{name}.py"))
    nbformat.write(notebook, NOTEBOOKS / f"{name}.ipynb")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebooks to build (default: all), e.g. 05_inside_the_unet")
    names = parser.parse_args(argv).names or sorted(path.stem for path in SOURCES.glob("*.py"))
    for name in names:
        print(f"{name}: executed in {build(name):.1f} s", flush=True)


if __name__ == "__main__":
    main()
