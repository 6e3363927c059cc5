"""Per-image token budgets from the singular-value spectrum of visual features (E-AdaPrune).

An image's features form a matrix X (N tokens x d channels). With singular values s_1 >= s_2 >= ..., the
energy curve is E(k) = sum_{i<=k} s_i^2 / sum_i s_i^2, and the budget for a ratio tau is the smallest k with
E(k) >= tau, clamped to [min_tokens, max_tokens]. Everything here is batched over images, runs on the
features' device, and computes in float32 (or wider) whatever the model's dtype.

Round-off is handled by two documented rules, so that budgets are reproducible and tau = 1 gives the numerical
rank rather than N:

* eigenvalues (s_i^2) at or below ``sqrt(N) * eps32 * s_1^2`` are round-off and count as zero energy (float32
  Gram eigenvalues of rank-deficient matrices measure a few eps32 * s_1^2 here, for N up to 2,880);
* a centred matrix whose energy is below ``N * eps32^2 * ||X||_F^2`` (uncentred) has no energy beyond the
  cancellation error of centring; its curve is flat at 1, so it gets ``min_tokens``.
"""

from __future__ import annotations

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps
RANDOMIZED_SEED = 0x5EED


def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def centered(features: torch.Tensor) -> torch.Tensor:
    """Subtracts each image's mean token: (n, N, d) -> (n, N, d)."""
    return features - features.mean(dim=-2, keepdim=True)


def _gram_eigenvalues(matrix: torch.Tensor) -> torch.Tensor:
    """All squared singular values of (n, N, d) matrices, descending, via the smaller Gram matrix."""
    n_tokens, n_channels = matrix.shape[-2:]
    gram = matrix @ matrix.mT if n_tokens <= n_channels else matrix.mT @ matrix
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)


def _randomized_eigenvalues(matrix: torch.Tensor, rank: int, oversampling: int, power_iterations: int) -> torch.Tensor:
    """Top-`rank` squared singular values by a Halko-Martinsson-Tropp range finder, descending.

    The test matrix comes from a fixed-seed generator rather than the global RNG (as `torch.svd_lowrank` would
    use): budgets are then deterministic and batch-invariant, and pruning never shifts a user's sampling RNG.
    """
    n_tokens, n_channels = matrix.shape[-2:]
    sketch_size = min(rank + oversampling, n_tokens, n_channels)
    generator = torch.Generator(device=matrix.device).manual_seed(RANDOMIZED_SEED)
    test_matrix = torch.randn(n_channels, sketch_size, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ test_matrix).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(matrix.mT @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    # The singular values of the small (sketch x d) projection, taken from its tall transpose: LAPACK's SVD is
    # several times faster on a tall matrix than on the same matrix wide.
    singular_values = torch.linalg.svdvals(matrix.mT @ basis)
    return singular_values[..., : min(rank, sketch_size)].square()


def _without_round_off(eigenvalues: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Zeroes descending eigenvalues at or below the round-off floor sqrt(N) * eps32 * s_1^2."""
    return eigenvalues.masked_fill(eigenvalues <= n_tokens**0.5 * FLOAT32_EPS * eigenvalues[..., :1], 0.0)


def energy_curves(
    features: torch.Tensor,
    *,
    center: bool = True,
    solver: str = "exact",
    randomized_rank: int = 128,
    randomized_oversampling: int = 16,
    randomized_power_iterations: int = 2,
) -> torch.Tensor:
    """Cumulative spectral energy E(k), k = 1..N, of each image: (n, N, d) -> (n, N), non-decreasing, last = 1.

    ``solver="exact"`` takes every eigenvalue of the Gram matrix. ``"randomized"`` takes the top
    ``randomized_rank`` singular values and the total energy from the Frobenius norm; beyond that rank the
    remaining energy is spread evenly over the remaining components (a flat tail), which can only over-estimate
    a budget that falls past the computed rank, never under-estimate it.
    """
    if features.ndim != 3:
        raise ValueError(f"features must have shape (images, tokens, channels), got {tuple(features.shape)}")
    raw = features.to(_compute_dtype(features))
    matrix = centered(raw) if center else raw
    n_tokens = matrix.shape[-2]

    # The exact spectrum is complete (when N > d, the d x d Gram matrix's d eigenvalues are all the nonzero ones);
    # the randomized one is not, and its total energy comes from the Frobenius norm.
    if solver == "exact":
        eigenvalues = _without_round_off(_gram_eigenvalues(matrix), n_tokens)
        total = eigenvalues.sum(-1, keepdim=True)
    elif solver == "randomized":
        eigenvalues = _randomized_eigenvalues(
            matrix, randomized_rank, randomized_oversampling, randomized_power_iterations
        )
        eigenvalues = _without_round_off(eigenvalues, n_tokens)
        total = matrix.square().sum((-2, -1)).unsqueeze(-1)
    else:
        raise ValueError(f"spectrum solver must be 'exact' or 'randomized', got {solver!r}")
    captured = eigenvalues.cumsum(-1)
    computed = captured.shape[-1]
    if computed < n_tokens:
        remaining = (total - captured[..., -1:]).clamp_min(0)
        remaining = remaining.masked_fill(remaining <= n_tokens**0.5 * FLOAT32_EPS * total, 0.0)
        steps = torch.arange(1, n_tokens - computed + 1, device=matrix.device, dtype=matrix.dtype)
        tail = captured[..., -1:] + remaining * steps / (n_tokens - computed)
        captured = torch.cat([captured, tail], dim=-1)
    total = captured[..., -1:]

    no_energy = total <= n_tokens * FLOAT32_EPS**2 * raw.square().sum((-2, -1)).unsqueeze(-1)
    curves = captured / torch.where(no_energy, torch.ones_like(total), total)
    return torch.where(no_energy, torch.ones_like(curves), curves)


def clamped_budgets(
    budgets: torch.Tensor, n_tokens: int, *, min_tokens: int = 1, max_tokens: int | None = None
) -> torch.Tensor:
    """Budgets clamped to [min_tokens, max_tokens] and to the unit's N tokens (the upper bound wins)."""
    upper = n_tokens if max_tokens is None else min(max_tokens, n_tokens)
    return budgets.clamp(min=min(min_tokens, upper), max=upper)


def budgets_from_curves(
    curves: torch.Tensor,
    energy_ratio: float,
    *,
    min_tokens: int = 1,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Smallest k with E(k) >= energy_ratio, clamped to [min_tokens, max_tokens] and to N: (n, N) -> (n,) long."""
    budgets = (curves < energy_ratio).sum(-1) + 1
    return clamped_budgets(budgets, curves.shape[-1], min_tokens=min_tokens, max_tokens=max_tokens)


def component_shares(curves: torch.Tensor) -> torch.Tensor:
    """Each component's share of its unit's energy, s_k^2 / sum_i s_i^2 = E(k) - E(k-1): (n, N) -> (n, N) >= 0.

    Differences of the float32 curve: a share is exact to about eps32 of the total energy."""
    return torch.diff(curves, dim=-1, prepend=torch.zeros_like(curves[..., :1])).clamp_min(0)


def budgets_from_shares(
    curves: torch.Tensor,
    marginal_share: float,
    *,
    min_tokens: int = 1,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Number of components holding at least `marginal_share` of their unit's energy, clamped to [min_tokens,
    max_tokens] and to N: (n, N) curves -> (n,) long."""
    budgets = (component_shares(curves) >= marginal_share).sum(-1)
    return clamped_budgets(budgets, curves.shape[-1], min_tokens=min_tokens, max_tokens=max_tokens)
