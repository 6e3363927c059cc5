"""The budget rules besides E-AdaPrune's ('marginal', 'floor', 'blend') against float64 NumPy references.

Each reference starts from the float64 SVD curve of `support.spectra` and applies the rule's definition; the rule's
parameter is taken halfway between the reference values where its budgets change, so float32 rounding cannot flip a
budget and budgets are compared exactly.
"""

from __future__ import annotations

import math
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch
from support.spectra import gaussian, reference_curve, with_spectrum

from adaprune.method_blend import BlendBudget
from adaprune.method_energy import EnergyBudget
from adaprune.method_fixed import FixedBudget
from adaprune.method_floor import FloorBudget
from adaprune.method_marginal import MarginalBudget
from adaprune.spectral_budget import energy_curves


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def feature_batches(rng: np.random.Generator) -> list[torch.Tensor]:
    """Gaussian batches with fewer and more tokens than channels, and spectra with a few dominant components."""
    decaying = with_spectrum(rng, 48, 64, np.array([9.0, 5.0, 3.0, 1.0, 0.5, 0.25]))
    flat = with_spectrum(rng, 48, 64, np.ones(20))
    return [gaussian(rng, 3, 40, 64), gaussian(rng, 2, 64, 24), torch.stack([decaying, flat])]


def midpoints(values: np.ndarray, gap: float = 1e-4) -> list[float]:
    """Values halfway between consecutive entries at least `gap` apart (float32 curves are exact to about 1e-6),
    and half the smallest positive entry."""
    distinct = np.unique(values[values > gap])
    apart = np.diff(distinct) > gap
    return [float(distinct[0] / 2), *((distinct[:-1][apart] + distinct[1:][apart]) / 2)]


def reference_shares(curve: np.ndarray) -> np.ndarray:
    return np.diff(curve, prepend=0.0)


def clamp(budget: int, n_tokens: int, min_tokens: int, max_tokens: int | None) -> int:
    upper = n_tokens if max_tokens is None else min(max_tokens, n_tokens)
    return min(max(budget, min(min_tokens, upper)), upper)


def energy_budget(curve: np.ndarray, energy_ratio: float) -> int:
    return int(np.argmax(curve >= energy_ratio)) + 1


@pytest.mark.parametrize(("min_tokens", "max_tokens"), [(1, None), (3, 12)])
def test_marginal_counts_the_components_above_the_share(
    rng: np.random.Generator, min_tokens: int, max_tokens: int | None
) -> None:
    for features in feature_batches(rng):
        references = [reference_curve(matrix) for matrix in features]
        shares = np.concatenate([reference_shares(curve) for curve in references])
        for share in midpoints(shares)[:: max(1, len(shares) // 40)]:
            rule = MarginalBudget(marginal_share=share, min_tokens=min_tokens, max_tokens=max_tokens)
            expected = [
                clamp(int((reference_shares(curve) >= share).sum()), len(curve), min_tokens, max_tokens)
                for curve in references
            ]
            assert rule.budgets(features).tolist() == expected, share


def test_marginal_keeps_strong_components_and_stops_where_a_token_adds_little(rng: np.random.Generator) -> None:
    """At lambda = 0.1 a spectrum with shares 46%, 32%, 20%, 1.3%, 0.3% keeps its 3 strong components; a flat one
    (20 components of 5% each) keeps none above the share and falls to min_tokens, where one tau keeps 18."""
    decaying = with_spectrum(rng, 48, 64, np.array([6.0, 5.0, 4.0, 1.0, 0.5]))
    flat = with_spectrum(rng, 48, 64, np.ones(20))
    features = torch.stack([decaying, flat])
    assert MarginalBudget(marginal_share=0.1, min_tokens=2).budgets(features).tolist() == [3, 2]
    assert EnergyBudget(energy_ratio=0.88, min_tokens=2).budgets(features).tolist() == [3, 18]


@pytest.mark.parametrize("weight", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("fixed_tokens", [4, 16])
def test_blend_rounds_the_weighted_mean_of_fixed_and_energy(
    rng: np.random.Generator, weight: float, fixed_tokens: int
) -> None:
    for features in feature_batches(rng):
        curves = energy_curves(features)
        references = [reference_curve(matrix) for matrix in features]
        for ratio in midpoints(np.concatenate(references))[::7]:
            rule = BlendBudget(energy_ratio=ratio, fixed_tokens=fixed_tokens, blend_weight=weight, min_tokens=2)
            expected = [
                clamp(
                    int(np.round(weight * fixed_tokens + (1 - weight) * energy_budget(curve, ratio))),
                    len(curve),
                    2,
                    None,
                )
                for curve in references
            ]
            assert rule.budgets_from_curves(curves).tolist() == expected, ratio


def test_blend_ends_are_energy_and_fixed(rng: np.random.Generator) -> None:
    features = gaussian(rng, 3, 40, 64)
    for ratio in (0.3, 0.7, 0.95):
        blend = BlendBudget(energy_ratio=ratio, fixed_tokens=9, blend_weight=0.0, min_tokens=1)
        assert torch.equal(blend.budgets(features), EnergyBudget(energy_ratio=ratio, min_tokens=1).budgets(features))
        blend = BlendBudget(energy_ratio=ratio, fixed_tokens=9, blend_weight=1.0, min_tokens=1)
        assert torch.equal(blend.budgets(features), FixedBudget(fixed_tokens=9).budgets(features))


@pytest.mark.parametrize(("fraction", "fixed_tokens"), [(0.5, 8), (0.25, 10), (1.0, 6), (0.14, 50)])
def test_floor_keeps_energy_budgets_above_a_fraction_of_the_target(
    rng: np.random.Generator, fraction: float, fixed_tokens: int
) -> None:
    """The floor is ceil(f * fixed_tokens) in exact decimal arithmetic (0.14 * 50 is 7, not float's 7.000...01)."""
    floor = math.ceil(Fraction(str(fraction)) * fixed_tokens)
    for features in feature_batches(rng):
        curves = energy_curves(features)
        references = [reference_curve(matrix) for matrix in features]
        for ratio in midpoints(np.concatenate(references))[::7]:
            rule = FloorBudget(energy_ratio=ratio, fixed_tokens=fixed_tokens, floor_fraction=fraction, min_tokens=1)
            expected = [clamp(max(floor, energy_budget(curve, ratio)), len(curve), 1, None) for curve in references]
            assert rule.budgets_from_curves(curves).tolist() == expected, ratio


def test_floor_never_goes_below_min_tokens(rng: np.random.Generator) -> None:
    features = gaussian(rng, 3, 40, 64)
    rule = FloorBudget(energy_ratio=0.01, fixed_tokens=4, floor_fraction=0.25, min_tokens=5)
    assert rule.budgets(features).tolist() == [5, 5, 5]


@pytest.mark.parametrize(
    ("rule", "settings", "message"),
    [
        (MarginalBudget, {"marginal_share": 0}, r"marginal_share must be a number in \(0, 1\], got 0"),
        (MarginalBudget, {"marginal_share": 1.5}, r"marginal_share must be a number in \(0, 1\], got 1.5"),
        (BlendBudget, {"blend_weight": -0.1}, r"blend_weight must be a number in \[0, 1\], got -0.1"),
        (BlendBudget, {"fixed_tokens": 0}, r"fixed_tokens must be an integer >= 1, got 0"),
        (FloorBudget, {"floor_fraction": 0}, r"floor_fraction must be a number in \(0, 1\], got 0"),
        (FloorBudget, {"min_tokens": 8, "max_tokens": 4}, r"max_tokens must be None or an integer >= min_tokens \(8\)"),
    ],
)
def test_bad_settings_name_the_value(rule: type, settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rule(**settings)
