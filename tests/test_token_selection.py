"""Keep masks and kept indices (`adaprune.token_selection`) against plain Python references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adaprune import PruningSettings
from adaprune.method_adaptprune import AdaptPruneSelector
from adaprune.method_autoprune import AutoPruneSelector
from adaprune.method_cls_attention import ClsAttentionSelector
from adaprune.method_fastv import FastVSelector
from adaprune.method_uniform import UniformSelector
from adaprune.methods import SELECTORS
from adaprune.token_selection import evenly_spaced_mask, kept_indices_from_mask, top_k_mask


def reference_top_k(scores: np.ndarray, budgets: list[int]) -> np.ndarray:
    """Per row, the `budget` highest scores, ties to the lower index, by a plain sort on (-score, index)."""
    keep = np.zeros(scores.shape, dtype=bool)
    for row, (values, budget) in enumerate(zip(scores.tolist(), budgets)):
        ranked = sorted(range(len(values)), key=lambda index: (-values[index], index))
        keep[row, ranked[:budget]] = True
    return keep


def reference_evenly_spaced(n_tokens: int, budget: int) -> list[int]:
    """The documented positions floor((j + 1/2) N / k), j < k, in exact integer arithmetic."""
    return [(2 * j + 1) * n_tokens // (2 * budget) for j in range(budget)]


def random_budgets(rng: np.random.Generator, n_rows: int, n_tokens: int) -> torch.Tensor:
    """Budgets in [0, N], always including 0 and N when there are enough rows."""
    budgets = rng.integers(0, n_tokens + 1, n_rows)
    budgets[: min(2, n_rows)] = [0, n_tokens][: min(2, n_rows)]
    return torch.from_numpy(budgets)


@pytest.mark.parametrize("seed", range(6))
def test_top_k_mask_matches_reference(seed: int) -> None:
    """Random scores (with many ties) and per-row budgets 0..N: the reference's mask, budgets[i] kept per row."""
    rng = np.random.default_rng(seed)
    n_rows, n_tokens = int(rng.integers(1, 6)), int(rng.integers(1, 40))
    scores = rng.integers(0, 4, (n_rows, n_tokens)).astype(np.float32) if seed % 2 else rng.random((n_rows, n_tokens))
    budgets = random_budgets(rng, n_rows, n_tokens)
    keep = top_k_mask(torch.from_numpy(scores), budgets)
    assert keep.dtype == torch.bool
    assert keep.sum(-1).tolist() == budgets.tolist()
    np.testing.assert_array_equal(keep.numpy(), reference_top_k(scores, budgets.tolist()))


def test_top_k_mask_keeps_highest_scores_and_breaks_ties_to_lower_index() -> None:
    """Row budgets 0, 1, 2, 3, N in one batch over the scores [.5, .9, .9, .1, .9]: the .9s in index order first."""
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9]]).expand(5, -1)
    keep = top_k_mask(scores, torch.tensor([0, 1, 2, 3, 5]))
    kept = [torch.nonzero(row).flatten().tolist() for row in keep]
    assert kept == [[], [1], [1, 2], [1, 2, 4], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("n_tokens", [1, 7, 64, 576])
def test_evenly_spaced_mask_keeps_exactly_k_spread_out(n_tokens: int) -> None:
    """Every budget 0..N keeps exactly k tokens at the documented positions, gaps at most ceil(N / k)."""
    budgets = torch.arange(n_tokens + 1)
    keep = evenly_spaced_mask(n_tokens, budgets)
    assert keep.shape == (n_tokens + 1, n_tokens)
    assert keep.sum(-1).tolist() == budgets.tolist()
    for budget, row in zip(budgets.tolist(), keep):
        kept = torch.nonzero(row).flatten().tolist()
        assert kept == reference_evenly_spaced(n_tokens, budget)
        if budget:
            spacing = math.ceil(n_tokens / budget)
            assert all(later - earlier <= spacing for earlier, later in zip(kept, kept[1:]))
            assert kept[0] < spacing and n_tokens - kept[-1] <= spacing
    assert keep[-1].all()


@pytest.mark.parametrize("seed", range(4))
def test_kept_indices_from_mask_are_ascending_nonzero_positions(seed: int) -> None:
    """Per-row views equal np.nonzero of each row; the padded tensor has max(budgets) columns."""
    rng = np.random.default_rng(seed)
    keep = torch.from_numpy(rng.random((int(rng.integers(1, 6)), int(rng.integers(1, 30)))) < rng.random())
    budgets = keep.sum(-1).tolist()
    padded, per_row = kept_indices_from_mask(keep, budgets)
    assert padded.shape == (keep.shape[0], max(budgets))
    assert len(per_row) == keep.shape[0]
    for row, indices in enumerate(per_row):
        np.testing.assert_array_equal(indices.numpy(), np.nonzero(keep[row].numpy())[0])
        assert torch.equal(padded[row, : budgets[row]], indices)


def test_kept_indices_from_an_empty_batch() -> None:
    """No images: an empty padded tensor and no rows."""
    padded, per_row = kept_indices_from_mask(torch.zeros(0, 5, dtype=torch.bool), [])
    assert padded.shape == (0, 0)
    assert per_row == []


def test_registered_selectors_resolve_by_name() -> None:
    """The registered names resolve to their selectors, signals and stages."""
    assert isinstance(PruningSettings(selector="cls_attention").token_selector, ClsAttentionSelector)
    assert isinstance(PruningSettings(selector="uniform").token_selector, UniformSelector)
    assert PruningSettings(selector="fastv", prune_layer=3).token_selector == FastVSelector(prune_layer=3)
    assert SELECTORS["cls_attention"].required_signals == frozenset({"cls_attention"})
    assert SELECTORS["uniform"].required_signals == frozenset()
    assert SELECTORS["fastv"].required_signals == frozenset({"prompt_attention"})
    assert PruningSettings(selector="adaptprune").token_selector == AdaptPruneSelector()
    assert SELECTORS["adaptprune"].required_signals == frozenset({"prompt_attention", "keys", "grid"})
    assert PruningSettings(selector="autoprune").token_selector == AutoPruneSelector()
    assert SELECTORS["autoprune"].required_signals == frozenset({"text_attention", "cls_attention"})
    stages = [SELECTORS[name].stage for name in ("cls_attention", "uniform", "fastv", "adaptprune", "autoprune")]
    assert stages == ["vision", "vision", "language", "language", "language"]
    assert sorted(SELECTORS) == ["adaptprune", "autoprune", "cls_attention", "fastv", "uniform"]


def test_unknown_selector_names_are_rejected_listing_the_registered_ones() -> None:
    """The error lists the registered names."""
    with pytest.raises(ValueError, match=r"\['cls_attention', 'uniform', 'fastv', 'adaptprune', 'autoprune'\].*'nope'"):
        PruningSettings(selector="nope")


@pytest.mark.parametrize("seed", range(3))
def test_selectors_keep_exactly_their_budgets(seed: int) -> None:
    """ClsAttentionSelector keeps the top-attended tokens, UniformSelector the evenly spaced ones."""
    rng = np.random.default_rng(seed)
    n_images, n_tokens = 4, 49
    attention = rng.random((n_images, n_tokens)).astype(np.float32)
    signals = {"features": torch.randn(n_images, n_tokens, 8), "cls_attention": torch.from_numpy(attention)}
    budgets = random_budgets(rng, n_images, n_tokens)

    cls_keep = ClsAttentionSelector().keep_mask(signals, budgets)
    np.testing.assert_array_equal(cls_keep.numpy(), reference_top_k(attention, budgets.tolist()))

    uniform_keep = UniformSelector().keep_mask(signals, budgets)
    for row, budget in zip(uniform_keep, budgets.tolist()):
        assert torch.nonzero(row).flatten().tolist() == reference_evenly_spaced(n_tokens, budget)
    for keep in (cls_keep, uniform_keep):
        assert keep.shape == (n_images, n_tokens)
        assert keep.sum(-1).tolist() == budgets.tolist()
