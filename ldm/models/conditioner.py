"""Conditioners: captions and a batch -> the ``Conditioning`` a network takes, over frozen text towers.

The contract: ``conditioner.condition(captions, batch, train) -> Conditioning``. ``batch`` may carry
precomputed text states (``text_states`` (B, L, D), ``text_pooled`` (B, P): ``data=latents``), used instead of
running the towers; a caption dropped for guidance ("") gets the empty caption's states. A single tower
(``ldm.models.text_encoders.FrozenOpenCLIPTextEncoder``) gives the tokens alone; ``TextConditioner`` below is
SDXL's conditioner.

SDXL-style conditioning: several frozen text towers and the size micro-conditioning vector.

``TextConditioner`` runs a list of frozen text encoders on the same captions, concatenates their
per-token states on the channel axis (SDXL: CLIP ViT-L/14 768 + OpenCLIP ViT-bigG/14 1280 = 2048) and
builds the U-Net's extra vector ``y`` (``adm_in_channels``): the pooled text embedding of one tower, then
a sinusoidal embedding of each size value (SDXL: original_size, crop_coords, target_size, two values
each, 256 wide: 1280 + 6 x 256 = 2816).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ldm.conditioning import Conditioning
from ldm.models.unet import timestep_embedding

SIZE_CONDITIONS = ("original_size", "crop_coords", "target_size")


def size_embedding(sizes: Tensor, dim: int) -> Tensor:
    """Sizes (B, K) (pixels, as ints or floats) -> (B, K * dim): each value embedded as a timestep is
    (cosines then sines, max period 10000), SDXL's and diffusers' ``add_time_proj`` formula."""
    return timestep_embedding(sizes.reshape(-1), dim).reshape(sizes.shape[0], -1)


def micro_conditioning_vector(
    pooled: Tensor | None, sizes: Sequence[Tensor], dim: int, keep: Sequence[Tensor] | None = None
) -> Tensor:
    """The U-Net's vector y (B, P + 2 * len(sizes) * dim): ``pooled`` (B, P) (or nothing), then each
    size condition's (B, 2) embedding; ``keep`` (one (B,) bool per condition) zeroes the embeddings of
    dropped conditions (guidance dropout, as SDXL drops conditions)."""
    parts = [] if pooled is None else [pooled]
    for index, values in enumerate(sizes):
        embedded = size_embedding(values, dim)
        if keep is not None:
            embedded = embedded * keep[index].to(embedded.dtype)[:, None]
        parts.append(embedded)
    return torch.cat(parts, dim=1)


class TextConditioner(nn.Module):
    """Several frozen text towers, their states concatenated, plus SDXL's micro-conditioning vector.

    ``text_encoders``: towers with ``forward(captions) -> (B, L, D_i)`` and ``encode(captions) -> (states,
    pooled)``, all of one context length; the context is (B, L, sum D_i) (``output_dim``).
    ``pooled_encoder``: index of the tower whose pooled, projected embedding starts the vector y (None:
    none). ``size_conditions``: the batch fields embedded after it, each (B, 2) (height, width or top,
    left), ``size_embedding_dim`` wide per value. ``adm_dim`` is y's width (0: the U-Net takes no y).
    ``zero_empty_prompt``: an empty caption gets zero states and a zero pooled embedding, as SDXL drops
    captions in training and as diffusers' SDXL pipeline encodes no negative prompt
    (``force_zeros_for_empty_prompt``); else it is encoded like any caption.
    ``size_condition_dropout`` maps a size condition to the probability that a training sample has its
    embedding zeroed (guidance dropout, like captions), e.g. ``{crop_coords: 0.1}``.
    """

    def __init__(
        self,
        text_encoders: Sequence[nn.Module],
        pooled_encoder: int | None = None,
        size_conditions: Sequence[str] = SIZE_CONDITIONS,
        size_embedding_dim: int = 256,
        zero_empty_prompt: bool = True,
        size_condition_dropout: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if not text_encoders:
            raise ValueError("model.text_encoder.text_encoders is empty: give at least one text tower")
        self.text_encoders = nn.ModuleList(text_encoders)
        lengths = [int(encoder.context_length) for encoder in self.text_encoders]
        if len(set(lengths)) != 1:
            raise ValueError(f"model.text_encoder.text_encoders have context lengths {lengths}; their states are "
                             "concatenated token by token, so give them one context_length")
        unknown = sorted(set(size_conditions) - set(SIZE_CONDITIONS))
        if unknown:
            raise ValueError(f"model.text_encoder.size_conditions has {unknown}; choose from {list(SIZE_CONDITIONS)}")
        if size_embedding_dim < 2 or size_embedding_dim % 2:
            raise ValueError(f"model.text_encoder.size_embedding_dim={size_embedding_dim} must be even and >= 2")
        self.context_length = lengths[0]
        self.output_dims = [int(encoder.output_dim) for encoder in self.text_encoders]
        self.output_dim = sum(self.output_dims)
        self.pooled_encoder = None
        self.pooled_dim = 0
        if pooled_encoder is not None:
            if not -len(lengths) <= pooled_encoder < len(lengths):
                raise ValueError(f"model.text_encoder.pooled_encoder={pooled_encoder} names no tower of "
                                 f"{len(lengths)}")
            self.pooled_encoder = pooled_encoder % len(lengths)
            pooled_dim = getattr(self.text_encoders[self.pooled_encoder], "pooled_dim", None)
            if not pooled_dim:
                raise ValueError(f"model.text_encoder.pooled_encoder={pooled_encoder}: that tower has no text "
                                 "projection, so no pooled embedding")
            self.pooled_dim = int(pooled_dim)
        self.size_conditions = tuple(size_conditions)
        self.size_embedding_dim = int(size_embedding_dim)
        self.adm_dim = self.pooled_dim + 2 * len(self.size_conditions) * self.size_embedding_dim
        self.zero_empty_prompt = zero_empty_prompt
        self.size_condition_dropout = check_size_condition_dropout(size_condition_dropout, self.size_conditions)
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "TextConditioner":
        """Frozen towers stay in eval mode whatever the trainer asks."""
        return super().train(False)

    @property
    def tokenizer(self):
        """The first tower's tokenizer (what sample grids and reports use to count tokens)."""
        return self.text_encoders[0].tokenizer

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """Captions -> (context (B, L, output_dim), pooled embedding (B, pooled_dim) or None)."""
        captions = list(captions)
        states, pooled = [], None
        for index, encoder in enumerate(self.text_encoders):
            tower_states, tower_pooled = encoder.encode(captions)
            states.append(tower_states)
            if index == self.pooled_encoder:
                pooled = tower_pooled
        context = torch.cat(states, dim=-1)
        if self.zero_empty_prompt:
            empty = torch.tensor([caption == "" for caption in captions], device=context.device)
            if bool(empty.any()):
                context = context.masked_fill(empty[:, None, None], 0.0)
                pooled = None if pooled is None else pooled.masked_fill(empty[:, None], 0.0)
        return context, pooled

    def forward(self, captions: Sequence[str]) -> Tensor:
        """Captions -> context (B, L, output_dim)."""
        return self.encode(captions)[0]

    def condition(self, captions: Sequence[str], batch: Mapping[str, Any], train: bool = False) -> Conditioning:
        """Captions and a batch (its size fields, each (B, 2), and optionally precomputed ``text_states`` and
        ``text_pooled``) -> Conditioning(tokens (B, L, output_dim), vector y (B, adm_dim)). With ``train``, each
        size condition is dropped with its ``size_condition_dropout`` probability."""
        missing = [name for name in self.size_conditions if name not in batch]
        if missing:
            raise KeyError(f"model.text_encoder.size_conditions={list(self.size_conditions)} but the batches "
                           f"lack {missing}: micro-conditioning needs bucketed data (data.buckets) whose batches "
                           f"carry them, or size_conditions=[]")
        if "text_states" in batch:
            context = with_empty_captions(batch["text_states"], captions, self)
            pooled = None
            if self.pooled_dim:
                if "text_pooled" not in batch:
                    raise KeyError("the precomputed latents have text states but no pooled embedding (text_pooled): "
                                   "precompute them again with this model.text_encoder")
                pooled = with_empty_captions(batch["text_pooled"], captions, lambda empty: self.encode(empty)[1])
        else:
            context, pooled = self.encode(captions)
        keep = None
        if train and self.size_condition_dropout:
            size = context.shape[0]
            keep = {name: torch.rand(size, device=context.device) >= self.size_condition_dropout.get(name, 0.0)
                    for name in self.size_conditions}
        return Conditioning(context, vector=self.vector(pooled, batch, keep))

    def vector(self, pooled: Tensor | None, sizes: Mapping[str, Tensor], keep: Mapping[str, Tensor] | None = None
               ) -> Tensor:
        """The U-Net's y (B, adm_dim) from the pooled embedding (B, pooled_dim) and the batch's size fields
        (each (B, 2)); ``keep`` maps a condition to a (B,) bool mask, False zeroing its embedding."""
        missing = [name for name in self.size_conditions if name not in sizes]
        if missing:
            raise KeyError(f"the batch lacks the size fields {missing} that micro-conditioning "
                           f"(model.text_encoder.size_conditions) embeds; use a data module that gives them")
        device = pooled.device if pooled is not None else next(self.parameters()).device
        values = [torch.as_tensor(sizes[name]).reshape(-1, 2).to(device) for name in self.size_conditions]
        masks = None if keep is None else [keep[name].to(device) for name in self.size_conditions]
        return micro_conditioning_vector(pooled if self.pooled_dim else None, values, self.size_embedding_dim, masks)


def with_empty_captions(states: Tensor, captions: Sequence[str], encode: Callable[[list[str]], Tensor]) -> Tensor:
    """Precomputed per-caption states (B, ...) with the rows whose caption was dropped ("", for classifier-free
    guidance) replaced by the empty caption's, ``encode([""])`` (1, ...)."""
    dropped = [index for index, caption in enumerate(captions) if caption == ""]
    if not dropped:
        return states
    empty = encode([""]).to(states.dtype)
    if empty.shape[1:] != states.shape[1:]:
        raise ValueError(f"precomputed text states {tuple(states.shape[1:])} differ from the text encoder's "
                         f"output {tuple(empty.shape[1:])}: precompute the latents with model.text_encoder's config")
    replaced = states.clone()
    replaced[dropped] = empty[0]
    return replaced


def check_size_condition_dropout(dropout: Mapping[str, float] | None, conditions: Sequence[str]) -> dict[str, float]:
    """``model.text_encoder.size_condition_dropout`` as a dict, each probability in [0, 1] and each name one of
    the embedded ``conditions``."""
    if not dropout:
        return {}
    for name, probability in dropout.items():
        if name not in conditions:
            raise ValueError(f"model.text_encoder.size_condition_dropout.{name}: the text encoder embeds no such "
                             f"size condition (model.text_encoder.size_conditions={list(conditions)})")
        if not (isinstance(probability, (int, float)) and 0.0 <= probability <= 1.0):
            raise ValueError(f"model.text_encoder.size_condition_dropout.{name}={probability!r} must be a "
                             f"probability in [0, 1]")
    return {name: float(probability) for name, probability in dropout.items()}


def vector_width(text_encoder: nn.Module) -> int:
    """Width of the vector y a text encoder gives the U-Net: a conditioner's ``adm_dim``, 0 for a single tower."""
    return int(getattr(text_encoder, "adm_dim", 0))


def default_sizes(height: int, width: int, batch_size: int, original_size: Sequence[int] | None = None,
                  crop_coords: Sequence[int] = (0, 0), target_size: Sequence[int] | None = None) -> dict[str, Tensor]:
    """The size fields for generating ``batch_size`` images of height x width: SDXL's defaults
    original_size = target_size = (height, width) and crop (0, 0), each overridable; each (B, 2) int64."""
    values = {"original_size": original_size or (height, width), "crop_coords": crop_coords,
              "target_size": target_size or (height, width)}
    for name, value in values.items():
        if len(value) != 2:
            raise ValueError(f"{name}={tuple(value)} must be two numbers (height, width or top, left)")
    return {name: torch.tensor([list(value)] * batch_size, dtype=torch.long) for name, value in values.items()}
