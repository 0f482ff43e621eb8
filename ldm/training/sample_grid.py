"""Sample grids from the EMA U-Net at validation and at the end of training, for the run's own captions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from ldm.config_check import check_number
from ldm.diffusion.sampling import check_sampler
from ldm.training.fsdp import whole_pipeline
from ldm.pipeline import TextToImagePipeline
from ldm.visualization import captioned_grid, to_pil_images


def choose_prompts(captions: Sequence[str], num_prompts: int, seed: int) -> list[str]:
    """The first ``num_prompts`` distinct captions in a permutation of ``captions`` drawn with ``seed``:
    the same captions and seed give the same choice, whatever process asks."""
    order = np.random.default_rng(seed).permutation(len(captions))
    chosen: list[str] = []
    for index in order:
        caption = captions[index]
        if caption and caption not in chosen:
            chosen.append(caption)
            if len(chosen) == num_prompts:
                break
    return chosen


class SampleGridLogger(L.Callback):
    """Samples a fixed list of prompts with fixed seeds and logs the captioned grid.

    ``prompts``: the list to sample; None (the default) chooses ``num_prompts`` distinct captions of
    the datamodule's validation data at setup, seeded by ``seed`` (``choose_prompts``), so the grid
    shows what the run trains on. The demo experiment lists the built-in set's prompts. ``sizes``: one
    [height, width] per listed prompt (mixed sizes and aspect ratios in one grid, each cell fitted
    unstretched into its square tile); None: every prompt at ``height`` x ``width``.

    Runs after each validation (not the sanity check) and at the end of training, on rank 0, with
    the module's EMA U-Net through ``pl_module.pipeline()`` (gathered from the shards under FSDP). The grid goes to every W&B or
    TensorBoard logger and to ``{output_dir}/samples/step_NNNNNN.png`` (and ``final.png``).
    """

    def __init__(
        self,
        output_dir: str,
        height: int,
        width: int,
        prompts: list[str] | None = None,
        num_prompts: int = 18,
        seed: int = 0,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        sampler: str | None = None,
        use_ema: bool = True,
        columns: int = 6,
        tile_size: int = 128,
        batch_size: int | None = None,
        sizes: list[list[int]] | None = None,
    ) -> None:
        if sizes is not None:
            if prompts is None or len(sizes) != len(prompts):
                raise ValueError(f"callbacks.sample_grid.sizes lists {len(sizes)} [height, width] pairs: give one per "
                                 f"prompt of callbacks.sample_grid.prompts ({len(prompts or [])} listed)")
            if not all(len(size) == 2 and min(size) > 0 for size in sizes):
                raise ValueError(f"callbacks.sample_grid.sizes={sizes} must hold positive [height, width] pairs")
        if prompts is not None and not prompts:
            raise ValueError("callbacks.sample_grid.prompts=[] is empty: list prompts, or null to choose validation captions")
        if num_prompts <= 0:
            raise ValueError(f"callbacks.sample_grid.num_prompts={num_prompts} must be > 0")
        check_number("callbacks.sample_grid.guidance_scale", guidance_scale)
        if num_inference_steps <= 0:
            raise ValueError(f"callbacks.sample_grid.num_inference_steps={num_inference_steps} must be > 0")
        self.prompts = list(prompts) if prompts is not None else None
        self.num_prompts = num_prompts
        self.output_dir = Path(output_dir)
        self.height, self.width = height, width
        self.seed = seed
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.sampler = sampler
        self.use_ema = use_ema
        self.columns = columns
        self.tile_size = tile_size
        self.batch_size = batch_size
        self.sizes = [(int(h), int(w)) for h, w in sizes] if sizes is not None else None
        self.last_grid_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a sampler that does not fit the model's objective (None: the objective's default), and
        choose the prompts from the validation captions when none were listed."""
        if self.sampler is not None:
            check_sampler(self.sampler, pl_module.objective.prediction_type, key="callbacks.sample_grid.sampler")
        multiple = (int(getattr(getattr(pl_module, "vae", None), "downsample_factor", 1))
                    * int(getattr(getattr(pl_module, "network", None), "downsample_factor", 1)))
        for height, width in self.sizes or [(self.height, self.width)]:
            if height % multiple or width % multiple:
                raise ValueError(f"callbacks.sample_grid: {height}x{width} is not a multiple of {multiple} (the VAE's "
                                 f"x the U-Net's downsampling factor) in each side; choose sides divisible by {multiple}")
        if self.prompts is not None:
            return
        datamodule = trainer.datamodule
        captions = datamodule.validation_captions() if hasattr(datamodule, "validation_captions") else []
        if not captions:
            raise ValueError("callbacks.sample_grid.prompts is null and the data has no validation captions: set "
                             "data.val_shards, or list prompts, e.g. 'callbacks.sample_grid.prompts=[a red circle]'")
        self.prompts = choose_prompts(captions, self.num_prompts, self.seed)

    @torch.no_grad()
    def generate(self, pipeline: TextToImagePipeline) -> list[torch.Tensor]:
        """Images (3, H, W) in [0, 1] for the callback's prompts, each at its size."""
        sizes = self.sizes or [(self.height, self.width)] * len(self.prompts)
        return pipeline.generate_at_sizes(
            self.prompts, sizes, seed=self.seed, num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale, sampler=self.sampler, batch_size=self.batch_size,
        )

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path | None:
        """Sample, save and log the grid ``{output_dir}/{name}.png`` (rank 0; every rank must call it)."""
        was_training = pl_module.training
        pl_module.eval()
        pipeline = whole_pipeline(trainer.strategy.model, pl_module, use_ema=self.use_ema)
        images = to_pil_images(self.generate(pipeline)) if pipeline is not None else None
        pl_module.train(was_training)
        if images is None:  # not rank 0
            return None
        grid = captioned_grid(images, self.prompts, columns=self.columns, tile_size=self.tile_size)
        path = self.output_dir / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        self.last_grid_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples/grid", images=[grid], caption=[name], step=trainer.global_step)
                logger.log_image(key="samples/images", images=images, caption=self.prompts, step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                tensor = torch.from_numpy(np.asarray(grid)).permute(2, 0, 1)
                logger.experiment.add_image("samples/grid", tensor, global_step=trainer.global_step)
        return path

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.log_grid(trainer, pl_module, f"step_{trainer.global_step:06d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.log_grid(trainer, pl_module, "final")
        if path is not None:
            print(f"Sample grid written to {path}")

    def state_dict(self) -> dict[str, Any]:
        return {}
