"""Evaluation outputs: the results JSON, the FID-vs-CLIP-score plot, sample grids, and W&B logging."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from ldm.visualization import captioned_grid, to_pil_images

TABLE_COLUMNS = ("guidance_scale", "fid", "kid_mean", "kid_std", "clip_score", "adherence_all", "precision", "recall",
                 "density", "coverage", "memorization_share_flagged", "num_samples", "seconds")


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    """Write ``results`` as indented JSON (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


def sample_grid(images: Tensor, captions: list[str], title: str, columns: int = 6) -> Image.Image:
    """A captioned grid of images (N, 3, H, W) in [0, 1], each caption prefixed with ``title``."""
    return captioned_grid(to_pil_images(images), [f"{title}: {c}" for c in captions[: len(images)]], columns=columns)


def plot_guidance_curve(rows: list[dict[str, Any]], path: str | Path, x_metric: str = "clip_score") -> Path:
    """FID (y) against ``x_metric`` (x) over guidance scales, each point labelled with its scale, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 4), dpi=100)
    xs = [row[x_metric] for row in rows]
    ys = [row["fid"] for row in rows]
    axes.plot(xs, ys, "o-")
    for row, x, y in zip(rows, xs, ys):
        axes.annotate(f"w={row['guidance_scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel(x_metric.replace("_", " "))
    axes.set_ylabel("FID")
    axes.set_title("Guidance sweep: FID vs " + x_metric.replace("_", " "))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_sigma_rel_curve(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """FID against the post-hoc EMA's sigma_rel, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 4), dpi=100)
    axes.plot([row["sigma_rel"] for row in rows], [row["fid"] for row in rows], "o-")
    axes.set_xlabel("sigma_rel (post-hoc EMA)")
    axes.set_ylabel("FID")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def format_table(rows: list[dict[str, Any]], first_column: str | None = None) -> str:
    """The sweep rows as a fixed-width text table (``first_column``, when given, leads)."""
    columns = ([first_column] if first_column else []) + [c for c in TABLE_COLUMNS if any(c in row for row in rows)]
    lines = ["".join(f"{c:>15}" for c in columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            cells.append(f"{value:>15.4f}" if isinstance(value, float) else f"{value!s:>15}")
        lines.append("".join(cells))
    return "\n".join(lines)


def log_to_wandb(loggers: list[Any], results: dict[str, Any], grids: dict[str, Image.Image], plot: Path | None) -> None:
    """Scalars of each guidance scale, the sweep table, the plot and the grids to every W&B logger given."""
    for logger in loggers:
        # Lightning's WandbLogger (the logger config group), known by its class name: evaluation imports no Lightning.
        if not any(cls.__name__ == "WandbLogger" for cls in type(logger).__mro__):
            continue
        rows = results["rows"]
        columns = [c for c in TABLE_COLUMNS if any(c in row for row in rows)]
        logger.log_table(key="eval/guidance_sweep", columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        for row in rows:
            logger.experiment.log({f"eval/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and v is not None})
        for name, grid in grids.items():
            logger.log_image(key=f"eval/samples/{name}", images=[grid])
        if plot is not None:
            logger.log_image(key="eval/fid_vs_clip_score", images=[str(plot)])
        logger.experiment.summary.update({"eval/results": results})
