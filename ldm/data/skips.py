"""Counting of samples that the data pipeline skips, by reason and by shard, with a few warnings per reason."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

logger = logging.getLogger("ldm.data")

# Damage: per-sample reasons count samples; shard reasons count shards (a truncated tar loses an
# unknown number of samples after the cut). These count towards the skip-rate ceiling.
SAMPLE_SKIP_REASONS = ("corrupt_image", "missing_image", "missing_caption", "invalid_json", "corrupt_latent")
SHARD_SKIP_REASONS = ("truncated_tar", "unreadable_shard")
DAMAGE_REASONS = SAMPLE_SKIP_REASONS + SHARD_SKIP_REASONS
# Samples left out on purpose by ldm.data.filters.MetadataFilters: counted, never an error.
FILTER_REASONS = ("filtered_size", "filtered_aesthetic", "filtered_watermark", "filtered_unsafe",
                  "filtered_caption_length")
# The fixed list matters: every DDP rank logs the same counters, or their collective calls would pair up wrongly.
ALL_SKIP_REASONS = DAMAGE_REASONS + FILTER_REASONS


class SkipCounter:
    """Counts skipped samples by reason (and by shard), and logs a warning for the first ``warn_limit`` of each reason.

    ``take_new()`` returns the counts added since its previous call: the pipeline attaches them to
    the next sample it yields, which is how counts made in dataloader workers reach the main process.
    """

    def __init__(self, warn_limit: int = 3) -> None:
        self.warn_limit = warn_limit
        self.samples_skipped_by_reason: Counter[str] = Counter()
        self.skipped_by_shard: dict[str, Counter[str]] = {}
        self._not_taken: Counter[str] = Counter()
        self.muted = False  # set while a resumed stream walks over samples whose skips were counted before

    def add(self, reason: str, detail: str = "", count: int = 1, shard: str | None = None) -> None:
        """Count ``count`` skips for ``reason`` (one of ALL_SKIP_REASONS) in ``shard``; ``detail`` goes into the warning."""
        if reason not in ALL_SKIP_REASONS:
            raise ValueError(f"skip reason {reason!r} is unknown; add it to ldm.data.skips.ALL_SKIP_REASONS")
        if self.muted:
            return
        self.samples_skipped_by_reason[reason] += count
        self._not_taken[reason] += count
        if shard is not None:
            self.skipped_by_shard.setdefault(shard, Counter())[reason] += count
        seen = self.samples_skipped_by_reason[reason]
        if seen <= self.warn_limit and reason in DAMAGE_REASONS:
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

    @property
    def damage_total(self) -> int:
        """Skips for damaged data so far (filtered samples left out)."""
        return sum(self.samples_skipped_by_reason[reason] for reason in DAMAGE_REASONS)

    @property
    def shard_damage_total(self) -> int:
        """Truncated and unreadable shards so far."""
        return sum(self.samples_skipped_by_reason[reason] for reason in SHARD_SKIP_REASONS)

    def worst_shards(self, limit: int = 5) -> str:
        """The shards with the most damage skips, e.g. ``"a.tar (corrupt_image: 40), b.tar (unreadable_shard: 1)"``."""
        damage = {shard: {r: c for r, c in counts.items() if r in DAMAGE_REASONS}
                  for shard, counts in self.skipped_by_shard.items()}
        ranked = sorted((item for item in damage.items() if item[1]), key=lambda item: -sum(item[1].values()))
        shown = [f"{shard} ({', '.join(f'{r}: {c}' for r, c in sorted(counts.items()))})"
                 for shard, counts in ranked[:limit]]
        more = f", and {len(ranked) - limit} more" if len(ranked) > limit else ""
        return ", ".join(shown) + more if shown else "none"

    def as_dict(self) -> dict[str, int]:
        """All skips so far, {reason: count}."""
        return dict(self.samples_skipped_by_reason)

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"
