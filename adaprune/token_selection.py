"""The selection steps every selector shares: top-k by score, evenly spaced picks, and kept indices from a mask.

Selectors (`method_*.py`, registered in `methods.py`) turn per-unit signals and budgets into a keep mask with
these. All functions are batched over units and free of per-token Python loops.
"""

from __future__ import annotations

import torch


def top_k_mask(scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Keeps the `budgets[i]` highest-scoring tokens of each row (ties go to the lower index): (n, N) -> (n, N) bool."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank_kept = torch.arange(scores.shape[-1], device=scores.device) < budgets.unsqueeze(-1)
    return torch.zeros_like(rank_kept).scatter(-1, order, rank_kept)


def evenly_spaced_mask(n_tokens: int, budgets: torch.Tensor) -> torch.Tensor:
    """Keeps `budgets[i]` tokens evenly spaced in raster order: index floor((j + 1/2) N / k), j < k."""
    slots = torch.arange(n_tokens, device=budgets.device)
    budgets_col = budgets.unsqueeze(-1)
    positions = ((2 * slots + 1) * n_tokens).div(2 * budgets_col.clamp_min(1), rounding_mode="floor")
    positions = torch.where(slots < budgets_col, positions, torch.full_like(positions, n_tokens))
    mask = torch.zeros(budgets.shape[0], n_tokens + 1, dtype=torch.bool, device=budgets.device)
    return mask.scatter(-1, positions, True)[:, :n_tokens]


def kept_indices_from_mask(keep: torch.Tensor, budgets: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Ascending kept indices per row. Returns the padded (n, max k) index tensor and per-row views of it.

    `budgets` are the host-side row counts of `keep` (the caller's one host sync), so no further sync happens.
    """
    n_tokens = keep.shape[-1]
    positions = torch.arange(n_tokens, device=keep.device).expand_as(keep)
    padded = torch.where(keep, positions, n_tokens).sort(dim=-1).values[:, : max(budgets, default=0)]
    return padded, [padded[row, :count] for row, count in enumerate(budgets)]
