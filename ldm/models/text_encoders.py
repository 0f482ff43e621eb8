"""Frozen OpenCLIP text towers that turn captions into per-token context for the denoising network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from ldm.conditioning import Conditioning
from ldm.models.conditioner import with_empty_captions

LAYERS = ("last", "penultimate")


class FrozenOpenCLIPTextEncoder(nn.Module):
    """OpenCLIP text transformer returning per-token hidden states, frozen.

    Either a named open_clip model (``model_name="ViT-H-14"``, ``pretrained`` a hub tag such as
    ``"laion2b_s32b_b79k"`` or a local ``.pt``/``.safetensors`` path; the vision tower is dropped),
    or a text tower built from ``text_cfg`` (the keyword arguments of
    ``open_clip.transformer.TextTransformer``) with random weights drawn from ``seed``: no
    pretrained text tower exists offline, and a frozen random transformer still maps different
    captions to different, learnable-from context.

    ``layer="penultimate"`` takes the output of the second-to-last block (Stable Diffusion 2.x),
    ``"last"`` that of the final block (SD 1.x); both go through the final LayerNorm unless
    ``final_norm=False`` (SDXL reads both its towers' penultimate states without it).
    Captions are tokenised with open_clip's BPE tokenizer and padded to ``context_length`` tokens
    with ``pad_token_id``: 0 as OpenCLIP pads (SD 2.x), or 49407, the end token, as SD 1.x's
    CLIPTokenizer pads. The U-Net attends to the padding tokens' states too, so a pretrained model
    must be fed the padding it was trained with. ``quick_gelu``: a ``text_cfg`` tower with OpenAI CLIP's
    QuickGELU activation (SD 1.x's ViT-L/14) instead of GELU.

    ``encode`` also returns the pooled, projected embedding (CLIP's text embedding: the last block's
    normalised state at the end token, times ``text_projection``) of a tower that has a projection
    (``pooled_dim``; SDXL adds OpenCLIP ViT-bigG/14's to the U-Net's timestep embedding).
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        text_cfg: dict[str, Any] | None = None,
        layer: str = "last",
        tokenizer_name: str = "ViT-H-14",
        seed: int = 0,
        pad_token_id: int = 0,
        quick_gelu: bool = False,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        if (model_name is None) == (text_cfg is None):
            raise ValueError(
                "FrozenOpenCLIPTextEncoder needs exactly one of model_name (an open_clip model such as "
                "'ViT-H-14') or text_cfg (the arguments of a randomly initialised TextTransformer)"
            )
        if layer not in LAYERS:
            raise ValueError(f"text encoder layer={layer!r}; choose one of {LAYERS}")
        self.layer = layer
        self.pad_token_id = pad_token_id
        self.final_norm = final_norm
        if model_name is not None:
            # the default device, so that a preset also builds on the meta device (parameter counts)
            clip = open_clip.create_model(model_name, pretrained=pretrained, device=torch.get_default_device())
            del clip.visual
            self.tower = clip
            self.tokenizer = open_clip.get_tokenizer(model_name)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                activation = {"act_layer": open_clip.transformer.QuickGELU} if quick_gelu else {}
                self.tower = open_clip.transformer.TextTransformer(**{**activation, **dict(text_cfg)})
            self.tokenizer = open_clip.get_tokenizer(tokenizer_name)
        self.context_length = int(self.tower.positional_embedding.shape[0])
        self.output_dim = int(self.tower.token_embedding.weight.shape[1])
        projection = getattr(self.tower, "text_projection", None)
        projection = projection.weight.T if isinstance(projection, nn.Linear) else projection
        self.pooled_dim = None if projection is None else int(projection.shape[1])
        self.freeze()

    def freeze(self) -> None:
        """Put the tower in eval mode and stop gradients to its weights."""
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenOpenCLIPTextEncoder":
        """A frozen encoder stays in eval mode whatever the trainer asks (no dropout)."""
        return super().train(False)

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """Captions -> token ids (B, context_length) int64, padded with ``pad_token_id`` after the end token."""
        tokens = self.tokenizer(list(captions), context_length=self.context_length)
        if self.pad_token_id:
            end = (tokens == self.tokenizer.eot_token_id).int().argmax(dim=1, keepdim=True)
            after_end = torch.arange(tokens.shape[1])[None] > end
            tokens = tokens.masked_fill(after_end, self.pad_token_id)
        return tokens

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> Tensor:
        """Captions -> per-token states (B, context_length, output_dim)."""
        device = self.tower.token_embedding.weight.device
        tokens = self.tokenize(captions).to(device)
        return self.encode_tokens(tokens)

    def condition(self, captions: Sequence[str], batch: Mapping[str, Any] | None = None,
                  train: bool = False) -> Conditioning:
        """The conditioner contract (``ldm.models.conditioner``): Conditioning(tokens (B, context_length,
        output_dim)), from the batch's precomputed ``text_states`` when it has them, else from the tower."""
        if batch is not None and "text_states" in batch:
            return Conditioning(with_empty_captions(batch["text_states"], captions, self))
        return Conditioning(self(list(captions)))

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """Captions -> (per-token states (B, context_length, output_dim), pooled embedding (B, pooled_dim) or
        None for a tower without a text projection)."""
        device = self.tower.token_embedding.weight.device
        tokens = self.tokenize(captions).to(device)
        return self.encode_tokens_and_pool(tokens)

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Token ids (B, L) -> per-token states (B, L, output_dim) from the chosen layer."""
        return self._run_blocks(tokens, pool=False)[0]

    def encode_tokens_and_pool(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """Token ids (B, L) -> (per-token states (B, L, output_dim), pooled embedding (B, pooled_dim) or None)."""
        return self._run_blocks(tokens, pool=self.pooled_dim is not None)

    def _run_blocks(self, tokens: Tensor, pool: bool) -> tuple[Tensor, Tensor | None]:
        tower = self.tower
        cast_dtype = tower.token_embedding.weight.dtype
        x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding.to(cast_dtype)
        attn_mask = tower.attn_mask
        blocks = tower.transformer.resblocks
        num_blocks = len(blocks) - (1 if self.layer == "penultimate" else 0)
        batch_first = getattr(tower.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        states = None
        for index, block in enumerate(blocks if pool else blocks[:num_blocks]):
            if index == num_blocks:
                states = x
            x = block(x, attn_mask=attn_mask)
        states = x if states is None else states
        if not batch_first:
            x, states = x.transpose(0, 1), states.transpose(0, 1)
        if self.final_norm:
            states = tower.ln_final(states)
        if not pool:
            return states, None
        # CLIP pools at the end token, the highest id (argmax finds its first occurrence also under end-token padding)
        end = tower.ln_final(x)[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        projection = tower.text_projection
        pooled = projection(end) if isinstance(projection, nn.Linear) else end @ projection
        return states, pooled
