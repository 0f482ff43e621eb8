"""The ``eval:`` node of ``configs/eval.yaml`` as named, typed, range-checked fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ldm.diffusion.sampling import SAMPLERS
from ldm.models.conditioner import SIZE_CONDITIONS


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
    seeds: list[int] | None = None
    bootstrap_resamples: int = 200
    confidence: float = 0.95
    prdc_k: int = 5
    memorization: bool = True
    memorization_shards: str | list[str] | None = None
    memorization_num_train: int | None = 4096
    memorization_pixel_size: int = 8
    memorization_threshold_ratio: float = 0.5
    memorization_grid_pairs: int = 12
    posthoc_ema_snapshots: str | None = None
    sigma_rels: list[float] | None = None
    micro_conditioning: dict[str, list[int]] = field(default_factory=dict)
    sizes: list[list[int]] | None = None

    def __post_init__(self) -> None:
        positive = ("num_samples", "resolution", "num_inference_steps", "batch_size", "kid_subset_size", "kid_subsets",
                    "prdc_k", "memorization_pixel_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be > 0")
        if self.num_reference is not None and self.num_reference <= 0:
            raise ValueError(f"eval.num_reference={self.num_reference} must be > 0, or null for every reference image")
        if self.bootstrap_resamples < 0 or self.bootstrap_resamples == 1:
            raise ValueError(f"eval.bootstrap_resamples={self.bootstrap_resamples} must be 0 (off) or >= 2, e.g. 200")
        if not 0 < self.confidence < 1:
            raise ValueError(f"eval.confidence={self.confidence} must lie in (0, 1), e.g. 0.95")
        if self.prdc_k >= self.num_samples:
            raise ValueError(f"eval.prdc_k={self.prdc_k} must be below eval.num_samples={self.num_samples}")
        if self.seeds is not None and not self.seeds:
            raise ValueError("eval.seeds=[] is empty: list generation seeds, e.g. [0,1,2], or null")
        if not 0 < self.memorization_threshold_ratio <= 1:
            raise ValueError(f"eval.memorization_threshold_ratio={self.memorization_threshold_ratio} must lie in (0, 1]")
        if self.memorization_num_train is not None and self.memorization_num_train <= 0:
            raise ValueError(f"eval.memorization_num_train={self.memorization_num_train} must be > 0, or null for all")
        if self.sigma_rels is not None:
            if not self.posthoc_ema_snapshots:
                raise ValueError("eval.sigma_rels needs eval.posthoc_ema_snapshots: the run's posthoc_ema folder")
            if not self.sigma_rels or not all(0 < s < 0.28 for s in self.sigma_rels):
                raise ValueError(f"eval.sigma_rels={self.sigma_rels} must list values in (0, 0.28)")
        for name, value in self.micro_conditioning.items():
            if name not in SIZE_CONDITIONS or len(value) != 2:
                raise ValueError(f"eval.micro_conditioning.{name}={value}: give {list(SIZE_CONDITIONS)} as two numbers "
                                 "each (height, width; top, left)")
        if self.sizes is not None:
            if not self.sizes or not all(len(size) == 2 and min(size) > 0 for size in self.sizes):
                raise ValueError(f"eval.sizes={self.sizes} must list positive [height, width] pairs, or be null")
            combined = [f"eval.{name}" for name in ("seeds", "sigma_rels") if getattr(self, name) is not None]
            combined += ["eval.memorization=true"] if self.memorization else []
            if combined:
                raise ValueError(f"eval.sizes (FID per size) does not combine with {', '.join(combined)}: set "
                                 f"eval.memorization=false and leave eval.seeds and eval.sigma_rels null")
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
    def generation_seeds(self) -> list[int]:
        """The seeds to generate with: ``seeds``, else ``[seed]``; the first gives the headline rows."""
        return [int(s) for s in self.seeds] if self.seeds else [int(self.seed)]

    @property
    def scales(self) -> list[float]:
        """The guidance scales to evaluate: ``guidance_scales``, else ``[guidance_scale]``."""
        return [float(s) for s in self.guidance_scales] if self.guidance_scales else [float(self.guidance_scale)]
