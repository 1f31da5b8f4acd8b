"""Frechet distance between two sets of feature vectors (the FID formula), in numpy.

FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2).
Both square roots are of symmetric PSD matrices, so they are taken by eigendecomposition
(eigh), which is exact and stable where a general sqrtm can return complex noise; eigenvalues
that round-off makes slightly negative are clipped to 0.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and (unbiased) covariance [D, D] of features [N, D], in float64."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features of shape {x.shape} have no covariance; pass [N >= 2, D].")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)  # symmetrise: covariances carry round-off asymmetry
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_gaussians(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray,
                               cov_b: np.ndarray) -> float:
    """Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b)."""
    root_a = _psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)).sum()
    diff = np.asarray(mu_a) - np.asarray(mu_b)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N, D] and [M, D]."""
    if np.shape(features_a)[1:] != np.shape(features_b)[1:]:
        raise ValueError(f"feature sets of shapes {np.shape(features_a)} and "
                         f"{np.shape(features_b)} differ in dimension; embed both with the same "
                         "classifier.")
    return frechet_distance_gaussians(*gaussian_stats(features_a), *gaussian_stats(features_b))
