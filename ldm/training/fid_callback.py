"""FID during training: EMA samples for a small fixed set of validation captions, against those real images."""

from __future__ import annotations

import time
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn

from ldm.diffusion.sampling import check_sampler
from ldm.evaluation.distributed import barrier
from ldm.evaluation.evaluate import SamplingSettings, generate_and_score
from ldm.evaluation.metrics import fid_from_features
from ldm.evaluation.reference import reference_features
from ldm.ranks import rank_and_world_size
from ldm.training.fsdp import whole_pipeline


class FIDCallback(L.Callback):
    """Logs ``val/fid`` (and ``val/adherence_all`` on the built-in set) after each validation.

    The reference is the first ``num_samples`` validation images of the datamodule and their
    captions; the same captions and seeds are sampled each time with the EMA U-Net, the images
    shared over the ranks. The feature extractor comes from ``feature_extractor()`` (built on rank 0
    first, so a classifier trained on first use is trained once). With so few samples FID is biased
    upwards: compare values within a run or between runs of the same settings, not with papers.
    """

    def __init__(
        self,
        feature_extractor: Callable[[], nn.Module],
        num_samples: int = 64,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        sampler: str | None = None,
        seed: int = 0,
        batch_size: int = 64,
        use_ema: bool = True,
        reference_cache_dir: str | None = None,
    ) -> None:
        if num_samples < 2:
            raise ValueError(f"callbacks.fid.num_samples={num_samples}: FID needs at least 2 samples (64 is cheap)")
        self.feature_extractor_factory = feature_extractor
        self.num_samples = num_samples
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.sampler = sampler
        self.seed = seed
        self.batch_size = batch_size
        self.use_ema = use_ema
        self.reference_cache_dir = reference_cache_dir
        self.extractor: nn.Module | None = None
        self.real_features: Tensor | None = None
        self.captions: list[str] = []
        self.history: list[tuple[int, float]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse at start-up a sampler that does not fit the model's objective (None: the objective's default)."""
        if self.sampler is not None:
            check_sampler(self.sampler, pl_module.objective.prediction_type, key="callbacks.fid.sampler")

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        urls = getattr(datamodule, "val_urls", None)
        if not urls:
            raise ValueError("callbacks.fid needs validation shards (data.val_shards, or data=synthetic)")
        rank, _ = rank_and_world_size(from_launcher=False)
        resolution = int(datamodule.resolution)

        def build() -> tuple[nn.Module, Tensor, list[str]]:
            extractor = self.feature_extractor_factory().to(pl_module.device).eval()
            name = getattr(extractor, "name", type(extractor).__name__)
            features, captions, _ = reference_features(urls, resolution, extractor, name, self.reference_cache_dir,
                                                       limit=self.num_samples)
            return extractor, features, captions

        built = build() if rank == 0 else None
        barrier()
        self.extractor, self.real_features, self.captions = built if rank == 0 else build()
        self.settings = SamplingSettings(sampler=self.sampler, num_inference_steps=self.num_inference_steps,
                                         seed=self.seed, batch_size=self.batch_size, height=resolution, width=resolution)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before training, outside any no-grad block: a first-use extractor may need to train itself.
        if self.extractor is None:
            self._prepare(trainer, pl_module)

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """FID (and prompt adherence on built-in captions) of the current EMA weights; every rank calls it."""
        if self.extractor is None:
            self._prepare(trainer, pl_module)
        was_training = pl_module.training
        pl_module.eval()
        pipeline = whole_pipeline(trainer.strategy.model, pl_module, use_ema=self.use_ema, rank0_only=False)
        scored = generate_and_score(pipeline, self.captions, self.guidance_scale,
                                    self.settings, self.extractor)
        pl_module.train(was_training)
        values = {"val/fid": fid_from_features(self.real_features, scored["features"])}
        if scored["adherence"] is not None:
            hits = scored["adherence"]["all"]
            values["val/adherence_all"] = sum(hits) / len(hits)
        return values

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        started = time.perf_counter()
        values = self.measure(trainer, pl_module)
        self.history.append((trainer.global_step, values["val/fid"]))
        pl_module.print(f"step {trainer.global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items())
                        + f" ({time.perf_counter() - started:.1f} s)")
        for name, value in values.items():
            pl_module.log(name, value, sync_dist=False)  # identical on every rank: gathered in sample order
