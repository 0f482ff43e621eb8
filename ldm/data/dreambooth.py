"""DreamBooth: instance images with their prompts plus prior preservation with the base model's class images.

The instance images are any shards (or the built-in set with ``synthetic.shapes``), captioned with the
new concept's rare token. For prior preservation the base model generates ``num_class_images`` images for
``class_prompts`` before the first step; they are cached in ``class_dir`` (regenerated only when the
prompts, count, sampling settings or base weights change) and every training batch gains
``class_batch_size`` of them, marked ``is_prior`` so that the loss weights them by ``prior_loss_weight``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.atomic import atomic_write
from ldm.data.datamodule import ShardDataModule

MARKER_NAME = "class_images.json"


def class_image_parameters(prompts: Sequence[str], num_images: int, seed: int, num_inference_steps: int,
                           guidance_scale: float, resolution: int, base: str | None) -> dict[str, Any]:
    """What a cache of class images depends on; a cache whose marker differs is regenerated."""
    return {"prompts": list(prompts), "num_images": num_images, "seed": seed, "resolution": resolution,
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "base": base}


def generate_class_images(pipeline: Any, class_dir: Path, parameters: dict[str, Any], batch_size: int = 32) -> None:
    """Generate ``parameters["num_images"]`` images (prompts in turn, seeds ``seed + i``) into ``class_dir``
    as ``{i:05d}.png``; the marker file, written last inside an atomic folder write, makes the cache whole."""
    prompts = [parameters["prompts"][i % len(parameters["prompts"])] for i in range(parameters["num_images"])]
    seeds = [parameters["seed"] + i for i in range(len(prompts))]
    size = parameters["resolution"]
    if class_dir.exists():
        shutil.rmtree(class_dir)
    with atomic_write(class_dir) as staging:
        staging.mkdir(parents=True)
        images = pipeline(prompts, height=size, width=size, num_inference_steps=parameters["num_inference_steps"],
                          guidance_scale=parameters["guidance_scale"], seed=seeds, batch_size=batch_size)
        for index, image in enumerate(images):
            pixels = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(staging / f"{index:05d}.png")
        (staging / MARKER_NAME).write_text(json.dumps({**parameters, "captions": prompts}, indent=1))


def read_class_images(class_dir: Path) -> tuple[torch.Tensor, list[str]]:
    """The cached class images (N, 3, H, W) in [-1, 1] and their prompts."""
    marker = json.loads((class_dir / MARKER_NAME).read_text())
    images = [torch.from_numpy(np.asarray(Image.open(class_dir / f"{i:05d}.png").convert("RGB")).copy())
              for i in range(marker["num_images"])]
    pixels = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, list(marker["captions"])


class DreamBoothDataModule(ShardDataModule):
    """``ShardDataModule`` over the instance images, plus prior preservation when ``num_class_images`` > 0.

    Batches: the instance batch (``image`` (B, 3, H, W), ``caption``), then ``class_batch_size`` class images
    appended to ``image`` and ``caption``, and ``is_prior`` (B + class_batch_size,) bool. Which class images a
    batch gets depends on the seed and the batch count alone, so a resumed run draws the same ones.
    """

    def __init__(self, class_prompts: Sequence[str] = (), num_class_images: int = 0, class_dir: str | None = None,
                 class_batch_size: int | None = None, class_num_inference_steps: int = 50,
                 class_guidance_scale: float = 2.0, **options: Any) -> None:
        super().__init__(**options)
        if num_class_images < 0:
            raise ValueError(f"data.num_class_images={num_class_images} must be >= 0 (0: no prior preservation)")
        if num_class_images and (not class_prompts or not class_dir):
            raise ValueError("data.num_class_images > 0 needs data.class_prompts (what the base model draws for the "
                             "class) and data.class_dir (where its images are cached)")
        self.class_prompts = list(class_prompts)
        self.num_class_images = num_class_images
        self.class_dir = Path(class_dir) if class_dir else None
        self.class_batch_size = class_batch_size or self.batch_size
        self.class_num_inference_steps = class_num_inference_steps
        self.class_guidance_scale = class_guidance_scale
        self.class_images: torch.Tensor | None = None
        self.class_captions: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.num_class_images and self.class_images is None and stage in (None, "fit"):
            self._ensure_class_images()

    def _ensure_class_images(self) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            raise RuntimeError("prior preservation generates its class images with the model being trained: "
                               "use DreamBoothDataModule through a Trainer")
        base = (getattr(module, "frozen_files", {}).get("pretrained") or {}).get("sha256")
        parameters = class_image_parameters(self.class_prompts, self.num_class_images, self.seed,
                                            self.class_num_inference_steps, self.class_guidance_scale,
                                            self.resolution, base)
        if self.trainer.is_global_zero and _read_marker(self.class_dir) != parameters:
            was_training = module.training
            with torch.no_grad():
                generate_class_images(module.pipeline(use_ema=False), self.class_dir, parameters)
            module.train(was_training)
        self.trainer.strategy.barrier("dreambooth_class_images")
        self.class_images, self.class_captions = read_class_images(self.class_dir)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.class_images is None or self.trainer is None or not self.trainer.training:
            return batch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.train_batches_consumed)
        chosen = torch.randint(0, len(self.class_images), (self.class_batch_size,), generator=generator)
        images = batch["image"]
        class_images = self.class_images[chosen].to(images.device, images.dtype)
        batch = dict(batch)
        batch["is_prior"] = torch.cat([torch.zeros(len(images), dtype=torch.bool),
                                       torch.ones(len(chosen), dtype=torch.bool)]).to(images.device)
        batch["image"] = torch.cat([images, class_images])
        batch["caption"] = list(batch["caption"]) + [self.class_captions[i] for i in chosen.tolist()]
        size = torch.tensor(class_images.shape[-2:], dtype=torch.long)  # class images are whole, uncropped
        for name, value in (("original_size", size), ("crop_coords", torch.zeros(2, dtype=torch.long)),
                            ("target_size", size)):
            if name in batch:
                batch[name] = torch.cat([batch[name], value.to(batch[name].device).expand(len(chosen), 2)])
        return batch


def _read_marker(class_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((class_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    marker.pop("captions", None)
    return marker
