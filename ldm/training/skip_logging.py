"""Logging of the data pipeline's skipped-sample counts, which travel inside each batch."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ldm.data.skips import ALL_SKIP_REASONS


class SkipCountLogging:
    """Mixin for LightningModules: accumulates ``batch["skipped"]`` ({reason: count}) and logs totals.

    Counts are summed over ranks when logged (``reduce_fx="sum"`` over each rank's running total),
    so ``data/skipped/<reason>`` is the number of samples dropped so far by the whole job. Every
    reason in ``ALL_SKIP_REASONS`` is logged at every step, zeros included: with ``sync_dist`` each
    logged value is a collective call, so ranks that had met different reasons would otherwise
    make different calls and hang or pair up wrongly.
    """

    def log_skip_counts(self, batch: dict[str, Any]) -> None:
        counts = getattr(self, "_skipped_by_reason", None)
        if counts is None:
            counts = self._skipped_by_reason = Counter()
        counts.update(batch.get("skipped") or {})
        for reason in ALL_SKIP_REASONS:
            self.log(f"data/skipped/{reason}", float(counts[reason]), reduce_fx="sum", sync_dist=True, batch_size=1)
