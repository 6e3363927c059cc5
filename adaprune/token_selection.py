"""The selection steps every selector shares: top-k by score, evenly spaced picks, and kept indices from a mask.

Selectors (`method_*.py`, registered in `methods.py`) turn per-unit signals and budgets into a keep mask with
these. All functions are batched over units and free of per-token Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PatchGrid:
    """Where each of n units' N tokens sits on a patch grid, for selectors with a spatial side: `cell` (n, N, 2)
    its row and column in its view, a square of `side` x `side` patches (a LLaVA image; a LLaVA-NeXT crop), and
    `view` (n, N) which view of its unit that is (-1: no place on a grid). Tokens of different views are never
    neighbours."""

    cell: torch.LongTensor
    view: torch.LongTensor
    side: int

    @classmethod
    def square(cls, side: int, n_units: int, device: torch.device | None = None) -> PatchGrid:
        """Every unit one view of side x side tokens in raster order."""
        index = torch.arange(side * side, device=device)
        cell = torch.stack([index // side, index % side], dim=-1)
        return cls(cell=cell.expand(n_units, -1, -1), view=torch.zeros_like(index).expand(n_units, -1), side=side)

    def centred(self) -> torch.Tensor:
        """(n, N, 2) coordinates in [-0.5, 0.5] across each view (its centre at 0)."""
        return self.cell.float() / max(self.side - 1, 1) - 0.5

    def squared_distances(self, tokens: torch.LongTensor) -> torch.Tensor:
        """(n, N) squared distance in patches from token `tokens[i]` of unit i to each of its tokens; inf in other
        views."""
        rows = torch.arange(len(tokens), device=tokens.device)
        offset = (self.cell - self.cell[rows, tokens].unsqueeze(1)).float()
        same_view = self.view == self.view[rows, tokens].unsqueeze(1)
        return offset.pow(2).sum(-1).masked_fill(~same_view, float("inf"))


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
