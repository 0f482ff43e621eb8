"""Continuing a training stream from a saved position: which batches each loader worker already gave."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def batches_per_worker(epoch_length: int, num_workers: int, batch_size: int) -> list[int]:
    """Full batches each dataloader worker yields in one epoch of ``epoch_length`` samples per rank.

    Mirrors ``ImageTextDataset``: worker ``w`` reads ``epoch_length // W + (w < epoch_length % W)``
    samples, and the loader drops each worker's partial last batch.
    """
    workers = max(1, num_workers)
    return [(epoch_length // workers + (w < epoch_length % workers)) // batch_size for w in range(workers)]


def batches_given_by_each_worker(batches_consumed: int, per_worker: list[int]) -> list[int]:
    """How many of the first ``batches_consumed`` batches of an epoch came from each worker.

    A DataLoader over an IterableDataset takes batches from its workers in turn, passing over a
    worker once it has run out; so batch ``k`` is the ``k``-th entry of the round-robin order.
    """
    if not 0 <= batches_consumed <= sum(per_worker):
        raise ValueError(f"batches_consumed={batches_consumed} must lie in [0, {sum(per_worker)}] (one epoch)")
    given = [0] * len(per_worker)
    remaining = batches_consumed
    while remaining:
        for worker, available in enumerate(per_worker):
            if remaining and given[worker] < available:
                given[worker] += 1
                remaining -= 1
    return given


class SkipAhead(torch.utils.data.IterableDataset):
    """Wraps a training stream so that its first iteration starts at epoch ``epoch``, after the samples
    that each worker gave in the first ``batches_consumed`` batches of that epoch.

    The skipped samples are read and decoded again (the stream's random crops and caption dropout
    draw from one generator per worker, so the only way to the same generator state is the same
    draws); resuming thus costs at most one epoch of loading. Later iterations run whole epochs.
    ``dataset`` must have ``epoch`` (the next iteration's epoch) and ``epoch_length`` (samples per rank).
    """

    def __init__(self, dataset: torch.utils.data.IterableDataset, epoch: int, batches_consumed: int,
                 batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.dataset = dataset
        self.dataset.epoch = epoch
        self.batch_size = batch_size
        self.skip_per_worker = batches_given_by_each_worker(
            batches_consumed, batches_per_worker(dataset.epoch_length, num_workers, batch_size))
        self.first_iteration = True  # per process: dataloader workers each hold a copy

    def __iter__(self) -> Iterator[Any]:
        samples = iter(self.dataset)
        if self.first_iteration:
            self.first_iteration = False
            info = torch.utils.data.get_worker_info()
            for _ in range(self.skip_per_worker[info.id if info is not None else 0] * self.batch_size):
                next(samples)
        yield from samples
