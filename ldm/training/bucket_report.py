"""The bucket report of a run: training samples per aspect-ratio bucket, and how many were upscaled more than 2x."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist

from ldm.atomic import atomic_write


def summed_over_ranks(report: dict[str, Any]) -> dict[str, Any]:
    """A datamodule's ``bucket_report()`` summed over the ranks (a collective call: every rank makes it).

    Ranks may have met different buckets, so the bucket list is gathered first, then the counts summed.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return report
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report["buckets"])
    totals: dict[tuple[int, int], list[int]] = {}
    for rows in gathered:
        for row in rows:
            counts = totals.setdefault((row["height"], row["width"]), [0, 0])
            counts[0] += row["samples"]
            counts[1] += row["upscaled_over_2x"]
    rows = [{"height": h, "width": w, "samples": s, "upscaled_over_2x": u}
            for (h, w), (s, u) in sorted(totals.items(), key=lambda item: item[0][1] / item[0][0])]
    return {"buckets": rows, "samples": sum(r["samples"] for r in rows),
            "upscaled_over_2x": sum(r["upscaled_over_2x"] for r in rows)}


class BucketReport(L.Callback):
    """At the end of each training epoch and of training, writes ``output_dir/bucket_report.json``
    (samples per bucket over the whole job, and how many were upscaled by more than 2x to cover their
    bucket: a sign that the buckets are too large for the data) and logs ``data/bucket/<h>x<w>/samples``,
    ``data/bucket/<h>x<w>/upscaled_over_2x``. Counts come from the datamodule (``bucket_report()``)."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)

    def report(self, trainer: L.Trainer) -> dict[str, Any] | None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "bucket_report"):
            return None
        report = summed_over_ranks(datamodule.bucket_report())
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.output_dir / "bucket_report.json") as temporary:
                temporary.write_text(json.dumps({"step": trainer.global_step, **report}, indent=2) + "\n")
            metrics = {}
            for row in report["buckets"]:
                name = f"data/bucket/{row['height']}x{row['width']}"
                metrics[f"{name}/samples"] = float(row["samples"])
                metrics[f"{name}/upscaled_over_2x"] = float(row["upscaled_over_2x"])
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        return report

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report(trainer)


__all__ = ["BucketReport", "summed_over_ranks"]
