"""The conditioning every denoising network takes: ``network(x_t, t, cond) -> prediction``.

A conditioner (``ldm.models.conditioner``) turns captions and a batch into one ``Conditioning``; guidance,
training and sampling pass it along without knowing which network reads which field. Torch only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """What a network is conditioned on, for a batch of B samples.

    ``tokens``: per-token text states (B, L, D) (a U-Net's cross-attention context). ``mask``: (B, L) bool, True
    for real tokens and False for padding, or None when every token counts (CLIP towers attend to their padding).
    ``vector``: a per-sample vector (B, P): a pooled text embedding, or the whole vector input a network adds to
    its timestep embedding (SDXL's y: pooled text and size embeddings). ``extras``: further per-sample inputs by
    name, each with the batch first (control latents, masks).
    """

    tokens: Tensor
    mask: Tensor | None = None
    vector: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def map(self, function: Callable[[Tensor], Tensor]) -> "Conditioning":
        """A Conditioning with ``function`` applied to each tensor (tokens, mask, vector, every extra)."""
        return Conditioning(
            tokens=function(self.tokens),
            mask=None if self.mask is None else function(self.mask),
            vector=None if self.vector is None else function(self.vector),
            extras={name: function(value) for name, value in self.extras.items()},
        )

    def rows(self, index: Tensor | Sequence[int] | slice) -> "Conditioning":
        """The samples at ``index`` along the batch."""
        return self.map(lambda tensor: tensor[index])

    def expand(self, batch_size: int) -> "Conditioning":
        """A batch-1 Conditioning broadcast to ``batch_size`` samples (a batch of B is returned as it is)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"a conditioning of batch {self.batch_size} cannot be broadcast to {batch_size}: give "
                             f"one for every sample or a single one")
        return self.map(lambda tensor: tensor.expand(batch_size, *tensor.shape[1:]))


def concatenate(parts: Sequence[Conditioning]) -> Conditioning:
    """The batches of ``parts`` one after another (all with the same fields)."""
    first = parts[0]
    for other in parts[1:]:
        if (other.mask is None) != (first.mask is None) or (other.vector is None) != (first.vector is None) \
                or other.extras.keys() != first.extras.keys():
            raise ValueError("conditionings to concatenate must have the same fields (mask, vector, extras)")
    return dataclasses.replace(
        first,
        tokens=torch.cat([part.tokens for part in parts]),
        mask=None if first.mask is None else torch.cat([part.mask for part in parts]),
        vector=None if first.vector is None else torch.cat([part.vector for part in parts]),
        extras={name: torch.cat([part.extras[name] for part in parts]) for name in first.extras},
    )
