"""The stratified validation loss: every validation sample noised once in each of K equal-probability bins.

Every validation sample is noised at one level in each of ``bins`` bins of equal probability under the
objective's training levels (``ldm.diffusion.stratified``; equal-width bins of t for discrete diffusion), with
levels and noise drawn from a generator seeded by (``seed``, the sample's key), and the latents are the VAE
posterior's mode. So the value depends on the weights alone: the same at every validation, in every run and on
any number of processes. Logged as ``val/loss_bin_{k}`` (k = 0 lowest noise) and their mean
``val/loss_stratified``; the per-sample loss and weighting are the training loss's (without offset noise or
input perturbation). ``subset`` < 1 keeps that share of the validation samples, chosen by key (so the same
samples on any number of processes), to bound the cost of K passes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ldm.conditioning import Conditioning
from ldm.config_check import check_number
from ldm.diffusion.stratified import stratified_quantiles


def sample_seed(seed: int, key: str) -> int:
    """A seed in [0, 2**60) from (``seed``, a sample's key): the same sample gets the same noise in every run and process."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)


class StratifiedValidationLoss:
    """``model.validation``: the stratified loss over ``bins`` noise-level bins (0 turns it off), noise seeded by
    ``seed`` and the sample keys, on the ``subset`` share of the validation samples (see the module docstring)."""

    def __init__(self, bins: int = 10, seed: int = 0, subset: float = 1.0) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 0:
            raise ValueError(f"model.validation.bins={bins!r} must be an integer >= 0 (0 turns the stratified "
                             f"validation loss off)")
        check_number("model.validation.subset", subset, minimum=0.0, strict_minimum=True, maximum=1.0)
        self.bins = bins
        self.seed = seed
        self.subset = subset
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def check(self, num_train_timesteps: int) -> None:
        """Refuse more bins than the schedule has timesteps."""
        if self.bins > num_train_timesteps:
            raise ValueError(f"model.validation.bins={self.bins} must lie in [0, {num_train_timesteps}] (0 turns the "
                             f"stratified validation loss off)")

    def start(self, device: torch.device) -> None:
        """Zero the per-bin sums at the start of a validation epoch."""
        self._sums = torch.zeros(self.bins, dtype=torch.float64, device=device)
        self._counts = torch.zeros(self.bins, dtype=torch.float64, device=device)

    @torch.no_grad()
    def accumulate(self, module: Any, batch: dict[str, Any], batch_idx: int, cond: Conditioning) -> None:
        """Add this batch's per-sample losses at one level of each bin to the running per-bin sums.
        ``module``: the LatentDiffusion (its VAE, objective and ``weighted_losses``); ``cond``: the batch's."""
        size = len(batch["caption"])
        keys = batch.get("key") or [f"batch{batch_idx}-{i}" for i in range(size)]
        seeds = [sample_seed(self.seed, key) for key in keys]
        kept = [i for i, seed in enumerate(seeds) if seed < self.subset * 2**60]
        if not kept:
            return
        if "latent_mean" in batch:
            latents = module.scale_latents(batch["latent_mean"][kept])
        else:
            latents = module.scale_latents(module.vae.encode(batch["image"][kept]).mode())
        cond = cond.rows(kept)
        generators = [torch.Generator().manual_seed(seeds[i]) for i in kept]
        num_timesteps = module.noise_schedule.num_train_timesteps
        # (B, K) quantiles and (B, K, C, h, w) noise, drawn on the CPU so every device sees the same numbers.
        u = torch.stack([stratified_quantiles(g, self.bins) for g in generators]).to(module.device)
        noise = torch.stack([torch.randn((self.bins, *latents.shape[1:]), generator=g) for g in generators])
        noise = noise.to(module.device, latents.dtype)
        for k in range(self.bins):
            levels = module.objective.levels_from_quantiles(u[:, k], num_timesteps)
            losses = module.weighted_losses(latents, cond, levels, noise[:, k], noise[:, k])
            self._sums[k] += losses.double().sum()
            self._counts[k] += latents.shape[0]

    def finish(self, module: Any) -> None:
        """Log the per-bin means and their mean, reduced over every rank's samples."""
        if not self.bins or self._sums is None or module.trainer is None:
            return
        # Sums over every rank's samples, then one division: the value does not depend on how samples were split.
        sums = module.trainer.strategy.reduce(self._sums, reduce_op="sum")
        counts = module.trainer.strategy.reduce(self._counts, reduce_op="sum")
        if not bool((counts > 0).all()):
            return
        per_bin = sums / counts
        for k, value in enumerate(per_bin.tolist()):
            module.log(f"val/loss_bin_{k}", value, sync_dist=True)  # equal on every rank: the mean keeps it
        module.log("val/loss_stratified", float(per_bin.mean()), sync_dist=True)
