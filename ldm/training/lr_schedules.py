"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math


class WarmupSchedule:
    """Linear warm-up from 0 over ``warmup_steps``, then constant or cosine decay to ``min_ratio``.

    A callable object rather than a lambda so that the scheduler pickles into checkpoints.
    ``total_steps`` is needed only for ``decay="cosine"``.
    """

    def __init__(self, warmup_steps: int = 0, decay: str = "constant", total_steps: int | None = None,
                 min_ratio: float = 0.0) -> None:
        if decay not in ("constant", "cosine"):
            raise ValueError(f"lr decay={decay!r}; choose 'constant' or 'cosine'")
        if decay == "cosine" and not total_steps:
            raise ValueError("lr decay='cosine' needs total_steps (set it to trainer.max_steps)")
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
