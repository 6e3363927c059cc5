"""Which tokens an image keeps once its budget is known.

A selector turns per-image signals (the visual features, and whatever else it declares in ``required_signals``,
e.g. the vision tower's [CLS] attention) and per-image budgets into a boolean keep mask. Selectors are small,
stateless and registered by name in ``SELECTORS``; the model computes the signals a selector asks for.
All functions are batched over images and free of per-token Python loops.
"""

from __future__ import annotations

from typing import ClassVar

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


class TokenSelector:
    """Base class: `keep_mask(signals, budgets)` returns which of each image's N tokens to keep."""

    name: ClassVar[str]
    required_signals: ClassVar[frozenset[str]] = frozenset()

    def keep_mask(self, signals: dict[str, torch.Tensor], budgets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ClsAttentionSelector(TokenSelector):
    """The tokens the vision tower's [CLS] query attends to most at the feature layer (mean over heads)."""

    name = "cls_attention"
    required_signals = frozenset({"cls_attention"})

    def keep_mask(self, signals: dict[str, torch.Tensor], budgets: torch.Tensor) -> torch.Tensor:
        return top_k_mask(signals["cls_attention"], budgets)


class UniformSelector(TokenSelector):
    """Tokens evenly spaced over the patch grid in raster order: a content-blind baseline."""

    name = "uniform"

    def keep_mask(self, signals: dict[str, torch.Tensor], budgets: torch.Tensor) -> torch.Tensor:
        return evenly_spaced_mask(signals["features"].shape[-2], budgets)


SELECTORS: dict[str, TokenSelector] = {selector.name: selector for selector in (ClsAttentionSelector(), UniformSelector())}


def get_selector(name: str) -> TokenSelector:
    """Looks a selector up by name, with an error that lists the registered ones."""
    try:
        return SELECTORS[name]
    except KeyError:
        raise ValueError(f"selector must be one of {sorted(SELECTORS)}, got {name!r}") from None
