"""CLIP score with an open_clip model, through torchmetrics' ``CLIPScore``.

torchmetrics computes the score (100 x cosine of image and caption embeddings, averaged, clamped at
0) with transformers' CLIP by default; it also accepts a callable returning a (model, processor)
pair, which is how an open_clip model (a hub tag, a local weights file, or a small random one for
tests) plugs in here without transformers' weights.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import open_clip
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.multimodal.clip_score import CLIPScore


class OpenCLIPModelAdapter(nn.Module):
    """The two methods of transformers' CLIPModel that torchmetrics calls, over an open_clip ``CLIP``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.config = SimpleNamespace()  # torchmetrics looks for config.text_config; open_clip truncates itself

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """Image embeddings (N, E) of preprocessed images (N, 3, S, S)."""
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Text embeddings (N, E) of token ids (N, L)."""
        return self.model.encode_text(input_ids)


class OpenCLIPProcessor:
    """Tokenises captions and resizes/normalises images (3, H, W) in [0, 1] the way an open_clip model expects."""

    def __init__(self, tokenizer: Any, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, text: list[str] | None = None, images: list[Tensor] | None = None, **_: Any) -> dict[str, Tensor]:
        if images is not None:
            batch = torch.stack([image.float() for image in images])
            if batch.max() > 1.0:
                raise ValueError("CLIP score images must be floats in [0, 1], not 0..255 integers")
            batch = F.interpolate(batch, size=(self.image_size, self.image_size), mode="bicubic",
                                  align_corners=False, antialias=True).clamp(0, 1)
            return {"pixel_values": (batch - self.mean) / self.std}
        tokens = self.tokenizer(list(text))
        return {"input_ids": tokens, "attention_mask": (tokens != 0).long()}


def build_open_clip(model_name: str | None = "ViT-B-32", pretrained: str | None = None,
                    model_cfg: dict[str, Any] | None = None, seed: int = 0) -> tuple[nn.Module, Any]:
    """(open_clip CLIP model, tokenizer): a named model (``pretrained`` a hub tag or a local file; None is
    random) or one built from ``model_cfg`` (``open_clip.CLIP`` keyword arguments) with weights from ``seed``."""
    if (model_name is None) == (model_cfg is None):
        raise ValueError("eval.clip needs exactly one of model_name (e.g. 'ViT-B-32') or model_cfg (a small CLIP)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_cfg is not None:
            model = open_clip.CLIP(**dict(model_cfg))
            tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)
        else:
            model = open_clip.create_model(model_name, pretrained=pretrained)
            tokenizer = open_clip.get_tokenizer(model_name)
    return model.eval(), tokenizer


def open_clip_score(model_name: str | None = "ViT-B-32", pretrained: str | None = None,
                    model_cfg: dict[str, Any] | None = None, seed: int = 0) -> CLIPScore:
    """A torchmetrics ``CLIPScore`` over an open_clip model; update with (images (N, 3, H, W) in [0, 1], captions)."""
    model, tokenizer = build_open_clip(model_name, pretrained, model_cfg, seed)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    processor = OpenCLIPProcessor(tokenizer, size, tuple(mean), tuple(std))
    return CLIPScore(model_name_or_path=lambda: (OpenCLIPModelAdapter(model), processor))
