"""Batching of stream samples (the one collate function of the data pipeline)."""

from __future__ import annotations

from collections import Counter

import torch


def collate_samples(samples: list[dict]) -> dict:
    """Batch samples: tensors stacked to (B, ...), other fields listed, ``"skipped"`` summed into one
    {reason: count} dict (what the producing worker dropped while reading this batch)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    skipped: Counter[str] = Counter()
    for sample in samples:
        skipped.update(sample.get("skipped") or {})
    batch: dict = {}
    for name in samples[0]:
        if name == "skipped":
            continue
        values = [sample[name] for sample in samples]
        if isinstance(values[0], torch.Tensor) and len({tuple(v.shape) for v in values}) > 1:
            raise ValueError(f"cannot batch {name!r} of shapes {sorted({tuple(v.shape) for v in values})}: samples "
                             f"of several buckets; batch them in the stream (batch_size=...) instead")
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    batch["skipped"] = dict(skipped)
    return batch
