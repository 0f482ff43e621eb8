"""Precision/recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al. 2020) from k-NN balls in feature space.

Both papers estimate a set's manifold as the union of balls around its samples, each of radius the
distance to its k-th nearest neighbour in the same set:

- precision = share of generated samples inside the real manifold (Kynkaanniemi et al. 2019, eq. 1-3);
- recall    = share of real samples inside the generated manifold (same paper);
- density   = (1 / (k M)) * sum over generated j of the number of real balls containing Y_j (Naeem et al.
  2020, eq. 5): about 1 when generated samples are distributed like real ones, above 1 when they crowd
  the real modes;
- coverage  = share of real samples whose ball contains at least one generated sample (Naeem et al. 2020, eq. 6).

Written on ``torch.cdist`` rather than through the authors' ``prdc`` package: that one needs scikit-learn
and numpy arrays for four lines on a distance matrix, and these run on the features' device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance (N,) from each row of ``features`` (N, D) to its k-th nearest other row."""
    if not 0 < k < len(features):
        raise ValueError(f"k={k} nearest neighbours need more than k samples (got {len(features)})")
    distances = torch.cdist(features.double(), features.double())
    return distances.kthvalue(k + 1, dim=1).values  # the 1st is the sample itself, at distance 0


def precision_recall_density_coverage(real: Tensor, generated: Tensor, k: int = 5) -> dict[str, float]:
    """``{"precision", "recall", "density", "coverage"}`` of generated features (M, D) against real (N, D)."""
    real, generated = real.double(), generated.double()
    real_radii, generated_radii = knn_radii(real, k), knn_radii(generated, k)
    distances = torch.cdist(real, generated)  # (N, M)
    inside_real = distances <= real_radii[:, None]  # generated j inside the ball of real i
    inside_generated = distances <= generated_radii[None, :]  # real i inside the ball of generated j
    return {
        "precision": float(inside_real.any(dim=0).double().mean()),
        "recall": float(inside_generated.any(dim=1).double().mean()),
        "density": float(inside_real.double().sum() / (k * generated.shape[0])),
        "coverage": float((distances.min(dim=1).values < real_radii).double().mean()),
    }
