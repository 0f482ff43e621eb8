"""Counting of samples that the data pipeline skips, by reason, with a few warnings per reason."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

logger = logging.getLogger("ldm.data")

# Reasons used by ldm.data.shards. Per-sample reasons count samples; shard reasons count shards
# (a truncated tar loses an unknown number of samples after the cut).
SAMPLE_SKIP_REASONS = ("corrupt_image", "missing_image", "missing_caption", "invalid_json")
SHARD_SKIP_REASONS = ("truncated_tar", "unreadable_shard")


class SkipCounter:
    """Counts skipped samples by reason, and logs a warning for the first ``warn_limit`` of each reason.

    ``take_new()`` returns the counts added since its previous call: the pipeline attaches them to
    the next sample it yields, which is how counts made in dataloader workers reach the main process.
    """

    def __init__(self, warn_limit: int = 3) -> None:
        self.warn_limit = warn_limit
        self.samples_skipped_by_reason: Counter[str] = Counter()
        self._not_taken: Counter[str] = Counter()

    def add(self, reason: str, detail: str = "", count: int = 1) -> None:
        """Count ``count`` skips for ``reason``; ``detail`` (where and why) goes into the warning."""
        self.samples_skipped_by_reason[reason] += count
        self._not_taken[reason] += count
        seen = self.samples_skipped_by_reason[reason]
        if seen <= self.warn_limit:
            last = " (further skips for this reason are counted, not logged)" if seen == self.warn_limit else ""
            logger.warning("Skipped data (%s): %s%s", reason, detail, last)

    def update(self, counts: Mapping[str, int]) -> None:
        """Add counts made elsewhere, e.g. a batch's ``batch["skipped"]``, without warnings."""
        for reason, count in counts.items():
            self.samples_skipped_by_reason[reason] += count
            self._not_taken[reason] += count

    def take_new(self) -> dict[str, int]:
        """Counts added since the previous call, {reason: count}."""
        new = dict(self._not_taken)
        self._not_taken.clear()
        return new

    @property
    def total(self) -> int:
        """All skips so far."""
        return sum(self.samples_skipped_by_reason.values())

    def as_dict(self) -> dict[str, int]:
        """All skips so far, {reason: count}."""
        return dict(self.samples_skipped_by_reason)

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"
