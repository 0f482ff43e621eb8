"""Error bars for evaluation metrics: bootstrap intervals over generated samples, and paired comparisons.

Every metric here is a function of per-sample quantities of the generated set (features, CLIP score,
prompt-adherence hits), so a resample of sample indices gives a resampled metric:

- interval: the percentile bootstrap (Efron and Tibshirani 1993, ch. 13) over generated samples with the
  real set held fixed: it measures the spread due to which images were generated, not the reference
  set's. FID and KID are biased at small n (Binkowski et al. 2018, sec. 3; Chong and Forsyth 2020), so the
  interval describes the estimate at this n, not the infinite-sample value.
- comparison of two models on the same captions and seeds (pairs (A_i, B_i) share caption and seed): the
  difference with a paired bootstrap interval (the same indices resample both), and a two-sided
  permutation p-value (Good 2005): each pair's labels swapped at random, p = (1 + #{|d_perm| >= |d|}) / (1 + R).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd


@dataclass
class SampleScores:
    """Per-sample results of one generated set, in sample order: features (N, D) float64, CLIP scores (N,)
    or None, prompt-adherence hits (N,) of all facts or None."""

    features: Tensor
    clip: Tensor | None = None
    adherence: Tensor | None = None

    def take(self, indices: Tensor) -> "SampleScores":
        pick = lambda x: None if x is None else x[indices]  # noqa: E731
        return SampleScores(self.features[indices], pick(self.clip), pick(self.adherence))


class MetricSet:
    """FID, KID, CLIP score and adherence of a ``SampleScores`` against fixed real features (N, D).

    The real set's mean and covariance are computed once; FID uses torchmetrics' ``_compute_fid`` (the
    formula FrechetInceptionDistance computes) and KID torchmetrics' ``poly_mmd`` on ``kid_subsets``
    random subsets of ``kid_subset_size`` (fewer subsets than the headline KID: one resample's spread
    over subsets is small next to the spread over resamples).
    """

    def __init__(self, real: Tensor, kid_subset_size: int = 100, kid_subsets: int = 10) -> None:
        self.real = real.double()
        self.real_mean = self.real.mean(dim=0)
        self.real_cov = torch.cov(self.real.T)
        self.kid_subset_size = kid_subset_size
        self.kid_subsets = kid_subsets

    def __call__(self, scores: SampleScores, generator: torch.Generator) -> dict[str, float]:
        generated = scores.features.double()
        values = {"fid": float(_compute_fid(self.real_mean, self.real_cov, generated.mean(dim=0), torch.cov(generated.T)))}
        size = min(self.kid_subset_size, len(self.real), len(generated))
        mmds = []
        for _ in range(self.kid_subsets):
            real_subset = self.real[torch.randperm(len(self.real), generator=generator)[:size]]
            generated_subset = generated[torch.randperm(len(generated), generator=generator)[:size]]
            mmds.append(float(poly_mmd(real_subset, generated_subset)))
        values["kid_mean"] = sum(mmds) / len(mmds)
        if scores.clip is not None:
            values["clip_score"] = max(float(scores.clip.double().mean()), 0.0)  # clamped as torchmetrics does
        if scores.adherence is not None:
            values["adherence_all"] = float(scores.adherence.double().mean())
        return values


def bootstrap_intervals(metrics: Callable[[SampleScores, torch.Generator], dict[str, float]], scores: SampleScores,
                        num_resamples: int = 200, confidence: float = 0.95, seed: int = 0) -> dict[str, dict[str, float]]:
    """Percentile bootstrap over generated samples: ``{metric: {"low", "high", "std", "num_resamples"}}``."""
    check_resampling(num_resamples, confidence)
    generator = torch.Generator().manual_seed(seed)
    n = len(scores.features)
    draws: dict[str, list[float]] = {}
    for _ in range(num_resamples):
        indices = torch.randint(0, n, (n,), generator=generator)
        for name, value in metrics(scores.take(indices), generator).items():
            draws.setdefault(name, []).append(value)
    return {name: summarize(torch.tensor(values, dtype=torch.float64), confidence) for name, values in draws.items()}


def paired_comparison(metrics: Callable[[SampleScores, torch.Generator], dict[str, float]], first: SampleScores,
                      second: SampleScores, num_resamples: int = 200, confidence: float = 0.95,
                      seed: int = 0) -> dict[str, dict[str, float]]:
    """``first`` minus ``second`` (same captions and seeds, in the same order) for every metric:
    ``{metric: {"difference", "low", "high", "std", "p_value", "num_resamples"}}``."""
    check_resampling(num_resamples, confidence)
    n = len(first.features)
    if len(second.features) != n:
        raise ValueError(f"a paired comparison needs as many samples on both sides ({n} vs {len(second.features)})")
    generator = torch.Generator().manual_seed(seed)
    observed = difference(metrics, first, second, generator)
    bootstrap: dict[str, list[float]] = {name: [] for name in observed}
    permuted: dict[str, list[float]] = {name: [] for name in observed}
    for _ in range(num_resamples):
        indices = torch.randint(0, n, (n,), generator=generator)
        for name, value in difference(metrics, first.take(indices), second.take(indices), generator).items():
            bootstrap[name].append(value)
        swap = torch.rand(n, generator=generator) < 0.5
        swapped_first, swapped_second = swap_pairs(first, second, swap)
        for name, value in difference(metrics, swapped_first, swapped_second, generator).items():
            permuted[name].append(value)
    results = {}
    for name, value in observed.items():
        summary = summarize(torch.tensor(bootstrap[name], dtype=torch.float64), confidence)
        extreme = sum(abs(d) >= abs(value) - 1e-12 for d in permuted[name])
        results[name] = {"difference": value, **summary, "p_value": (1 + extreme) / (1 + num_resamples)}
    return results


def difference(metrics: Callable[[SampleScores, torch.Generator], dict[str, float]], first: SampleScores,
               second: SampleScores, generator: torch.Generator) -> dict[str, float]:
    """Metric of ``first`` minus metric of ``second``; KID subsets drawn with the same generator state for both."""
    state = generator.get_state()
    a = metrics(first, generator)
    generator.set_state(state)
    b = metrics(second, generator)
    return {name: a[name] - b[name] for name in a}


def swap_pairs(first: SampleScores, second: SampleScores, swap: Tensor) -> tuple[SampleScores, SampleScores]:
    """The two sets with pair i exchanged where ``swap[i]`` (N,) bool."""
    def mix(a: Tensor | None, b: Tensor | None, take_b: bool) -> Tensor | None:
        if a is None or b is None:
            return None
        mask = swap.view(-1, *([1] * (a.ndim - 1)))
        return torch.where(mask, b, a) if not take_b else torch.where(mask, a, b)

    return (SampleScores(mix(first.features, second.features, False), mix(first.clip, second.clip, False),
                         mix(first.adherence, second.adherence, False)),
            SampleScores(mix(first.features, second.features, True), mix(first.clip, second.clip, True),
                         mix(first.adherence, second.adherence, True)))


def summarize(values: Tensor, confidence: float) -> dict[str, float]:
    """Percentile interval, standard deviation and count of bootstrap values (R,)."""
    tail = (1 - confidence) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"low": low, "high": high, "std": float(values.std()), "num_resamples": len(values)}


def spread_over_seeds(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation, min and max of each numeric metric that every row (one per generation seed) has."""
    names = [name for name, value in rows[0].items()
             if isinstance(value, float) and all(isinstance(row.get(name), float) for row in rows)]
    spread = {}
    for name in names:
        values = torch.tensor([row[name] for row in rows], dtype=torch.float64)
        spread[name] = {"mean": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0,
                        "min": float(values.min()), "max": float(values.max()), "num_seeds": len(values)}
    return spread


def check_resampling(num_resamples: int, confidence: float) -> None:
    if num_resamples < 2:
        raise ValueError(f"eval.bootstrap_resamples={num_resamples} must be >= 2 (e.g. 200)")
    if not 0 < confidence < 1:
        raise ValueError(f"eval.confidence={confidence} must lie in (0, 1), e.g. 0.95")
