"""The ``eval:`` node of ``configs/eval.yaml`` as named, typed, range-checked fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ldm.diffusion.samplers import SAMPLERS


@dataclass(frozen=True)
class EvalOptions:
    """What ``eval.py`` generates and how it scores it; each field is documented in ``configs/eval.yaml``.

    Built with ``ldm.config_check.build_options(EvalOptions, cfg.eval, "eval")``, so a misspelt key or
    a wrong type stops the job at start-up naming ``eval.<key>``; ranges are checked here.
    """

    num_samples: int = 256
    num_reference: int | None = None
    reference_shards: str | list[str] | None = None
    prompts_file: str | None = None
    resolution: int = 32
    sampler: str | None = None
    sampler_options: dict[str, Any] = field(default_factory=dict)
    num_inference_steps: int = 50
    guidance_scale: float = 2.0
    guidance_scales: list[float] | None = None
    seed: int = 1_000_000
    batch_size: int = 64
    use_ema: bool = True
    kid_subset_size: int = 100
    kid_subsets: int = 100
    num_grid_images: int = 18
    reference_cache_dir: str = "models/eval/reference"
    output_dir: str = "."

    def __post_init__(self) -> None:
        positive = ("num_samples", "resolution", "num_inference_steps", "batch_size", "kid_subset_size", "kid_subsets")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be > 0")
        if self.num_reference is not None and self.num_reference <= 0:
            raise ValueError(f"eval.num_reference={self.num_reference} must be > 0, or null for every reference image")
        if self.num_grid_images < 0:
            raise ValueError(f"eval.num_grid_images={self.num_grid_images} must be >= 0")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"eval.sampler={self.sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"eval.guidance_scale={self.guidance_scale} must be a finite number")
        if self.guidance_scales is not None:
            if not self.guidance_scales:
                raise ValueError("eval.guidance_scales=[] is empty: list scales, e.g. [1,2,3,5], or null")
            if not all(math.isfinite(scale) for scale in self.guidance_scales):
                raise ValueError(f"eval.guidance_scales={self.guidance_scales} must hold finite numbers only")

    @property
    def scales(self) -> list[float]:
        """The guidance scales to evaluate: ``guidance_scales``, else ``[guidance_scale]``."""
        return [float(s) for s in self.guidance_scales] if self.guidance_scales else [float(self.guidance_scale)]
