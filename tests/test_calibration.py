"""Calibration of tau to a target mean budget: budgets per image, the search, its errors, the statistics."""

from __future__ import annotations

import pytest
import torch

from adaprune.spectral_budget import budgets_from_curves, energy_curves
from adaprune.tools.calibration import (
    CalibrationError,
    UnitCurves,
    budget_statistics,
    calibrate_energy_ratio,
    ratio_inside,
)


def random_curves(seed: int, n_images: int, n_tokens: int = 64, units: int = 1) -> list[list[torch.Tensor]]:
    """Energy curves of random low-rank-ish features, `units` budget units per image."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n_images):
        rank = int(torch.randint(2, n_tokens, (1,), generator=generator))
        factors = torch.randn(units, n_tokens, rank, generator=generator)
        mixing = torch.randn(units, rank, 32, generator=generator)
        images.append(list(energy_curves(factors @ mixing).unbind(0)))
    return images


def test_image_budget_is_the_sum_of_its_units_clamped_budgets() -> None:
    """Units of different lengths; each unit is clamped on its own, as the model does."""
    curves = random_curves(0, 3, n_tokens=64, units=2) + random_curves(1, 2, n_tokens=40, units=3)
    unit_curves = UnitCurves.from_images(curves)
    for tau, min_tokens, max_tokens in ((0.5, 3, None), (0.9, 1, 20), (1.0, 8, 30)):
        expected = [
            sum(
                int(budgets_from_curves(unit[None], tau, min_tokens=min_tokens, max_tokens=max_tokens))
                for unit in units
            )
            for units in curves
        ]
        assert unit_curves.budgets(tau, min_tokens, max_tokens).tolist() == expected
    assert unit_curves.tokens_per_image == (128, 128, 128, 120, 120)


@pytest.mark.parametrize("share", [0.0, 0.3, 0.55, 1.0])
@pytest.mark.parametrize("units", [1, 3])
def test_calibrated_mean_meets_target_and_is_the_closest(share: float, units: int) -> None:
    """Targets across the reachable range (all images at min_tokens .. tau = 1), off the integers."""
    curves = UnitCurves.from_images(random_curves(2, 12, units=units))
    lowest, highest = (float(curves.budgets(tau, 2).double().mean()) for tau in (1e-9, 1.0))
    assert highest - lowest > 20
    target = lowest + share * (highest - lowest) + (0.37 if share < 1 else 0.0)
    result = calibrate_energy_ratio(curves, target, min_tokens=2)
    assert 0 < result.energy_ratio <= 1
    assert abs(result.mean_tokens - target) <= 1
    assert list(result.budgets) == curves.budgets(result.energy_ratio, 2).tolist()
    achievable = {float(curves.budgets(float(value), 2).double().mean()) for value in curves.breakpoints()}
    assert abs(result.mean_tokens - target) == pytest.approx(min(abs(mean - target) for mean in achievable))


def test_calibrated_ratio_is_strictly_inside_its_interval() -> None:
    """Curves recomputed one ulp up or down give the same budgets: tau sits away from every curve value."""
    images = random_curves(3, 10)
    result = calibrate_energy_ratio(UnitCurves.from_images(images), 20, min_tokens=1)
    for direction in (0.0, 2.0):
        nudged = [[torch.nextafter(curve, torch.full_like(curve, direction)) for curve in units] for units in images]
        assert UnitCurves.from_images(nudged).budgets(result.energy_ratio, 1).tolist() == list(result.budgets)


def test_ratio_inside_prefers_short_decimals_and_stays_inside_in_the_curve_dtype() -> None:
    assert ratio_inside(0.8012, 0.8731, torch.float32) == 0.84
    assert ratio_inside(0.7, 0.95, torch.float32) == 0.8
    for dtype in (torch.float32, torch.float64):
        lower = torch.tensor(0.7312345, dtype=dtype)
        upper = torch.nextafter(lower, torch.ones_like(lower))
        ratio = ratio_inside(float(lower), float(upper), dtype)
        assert float(lower) < float(torch.tensor(ratio, dtype=dtype)) <= float(upper)


@pytest.mark.parametrize("target", [2.5, 70.0])
def test_unreachable_target_names_the_reachable_range(target: float) -> None:
    curves = UnitCurves.from_images(random_curves(4, 6))
    with pytest.raises(CalibrationError, match=r"out of reach .* ranges from \d+\.\d\d .* to \d+\.\d\d"):
        calibrate_energy_ratio(curves, target, min_tokens=4)


def test_target_between_large_steps_is_refused() -> None:
    """One image whose curve is flat over four tokens: its budget jumps from 1 to 5, so a mean of 3 is unreachable."""
    curve = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0])
    curves = UnitCurves.from_images([[curve]])
    with pytest.raises(CalibrationError, match="within one token of 3: the mean budget jumps from 1.00 to 5.00"):
        calibrate_energy_ratio(curves, 3, min_tokens=1)
    assert calibrate_energy_ratio(curves, 4.5, min_tokens=1).budgets == (5,)


def test_no_images_is_an_error() -> None:
    with pytest.raises(CalibrationError, match="no images"):
        UnitCurves.from_images([])


def test_statistics() -> None:
    stats = budget_statistics([10, 20, 30, 40, 50], [100] * 5)
    assert stats == {
        "mean": 30.0,
        "min": 10,
        "max": 50,
        "p10": 14.0,
        "p25": 20.0,
        "p50": 30.0,
        "p75": 40.0,
        "p90": 46.0,
        "mean_kept_fraction": 0.3,
    }
