"""Float64 NumPy references for spectra and the matrices the spectral tests build (shared by the test modules)."""

from __future__ import annotations

import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)


def round_off_factor(n_tokens: int) -> float:
    """Eigenvalues at or below this times s_1^2 are round-off (module docstring: sqrt(N) * eps32)."""
    return np.sqrt(n_tokens) * EPS32


def reference_curve(features: torch.Tensor, center: bool = True) -> np.ndarray:
    """E(k), k = 1..N, of one (N, d) matrix by a float64 SVD of its float32 values, with the round-off rules."""
    raw = features.float().numpy().astype(np.float64)
    matrix = raw - raw.mean(axis=0, keepdims=True) if center else raw
    n_tokens = matrix.shape[0]
    energies = np.linalg.svd(matrix, compute_uv=False) ** 2
    energies[energies <= round_off_factor(n_tokens) * energies[0]] = 0.0
    captured = np.cumsum(energies)
    captured = np.concatenate([captured, np.full(n_tokens - captured.size, captured[-1])])
    if captured[-1] <= n_tokens * EPS32**2 * np.square(raw).sum():
        return np.ones(n_tokens)
    return captured / captured[-1]


def gaussian(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    """A float32 standard Gaussian tensor."""
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def with_spectrum(
    rng: np.random.Generator, n_tokens: int, n_channels: int, singular_values: np.ndarray, mean_norm: float = 0.0
) -> torch.Tensor:
    """float32 U diag(s) V^T (+ the same row of norm `mean_norm` in every token), built in float64.

    U's orthonormal columns are orthogonal to the all-ones vector, so centring removes exactly the added row.
    """
    rank = len(singular_values)
    ones = np.full((n_tokens, 1), n_tokens**-0.5)
    draws = rng.standard_normal((n_tokens, rank))
    left = np.linalg.qr(draws - ones @ (ones.T @ draws))[0]
    right = np.linalg.qr(rng.standard_normal((n_channels, rank)))[0]
    mean_row = rng.standard_normal(n_channels)
    matrix = (left * singular_values) @ right.T + mean_norm * mean_row / np.linalg.norm(mean_row)
    return torch.from_numpy(matrix.astype(np.float32))
