"""Calibration of every calibrated budget rule to a target mean budget: budgets per image, the search, its errors, the
statistics; the marginal rule against float64 water-filling."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from adaprune.method_energy import EnergyBudget
from adaprune.method_fixed import FixedBudget
from adaprune.method_marginal import MarginalBudget
from adaprune.methods import BUDGET_RULES
from adaprune.spectral_budget import energy_curves
from adaprune.spectral_rules import SpectralBudgetRule
from adaprune.tools.calibration import (
    CalibrationError,
    UnitCurves,
    budget_statistics,
    calibrate,
    ratio_inside,
    settings_for_target,
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


CALIBRATED_RULES = [rule for rule in BUDGET_RULES.values() if rule.calibrated_setting is not None]


def rule_for(
    rule: type[SpectralBudgetRule], target: float, min_tokens: int, units: int = 1, **settings: float
) -> SpectralBudgetRule:
    """The rule with its target setting (if any) at the target per unit of images with `units` units each, as
    calibration sets it."""
    if rule.target_setting is not None:
        settings[rule.target_setting] = round(target / units)
    return rule(min_tokens=min_tokens, **settings)


def test_every_calibrated_rule_is_spectral() -> None:
    assert {rule.name for rule in CALIBRATED_RULES} >= {"energy", "marginal", "floor", "blend"}
    assert all(issubclass(rule, SpectralBudgetRule) for rule in CALIBRATED_RULES)


@pytest.mark.parametrize("rule", CALIBRATED_RULES, ids=lambda rule: rule.name)
def test_image_budget_is_the_sum_of_its_units_clamped_budgets(rule: type[SpectralBudgetRule]) -> None:
    """Units of different lengths; each unit is clamped on its own, as the model does."""
    curves = random_curves(0, 3, n_tokens=64, units=2) + random_curves(1, 2, n_tokens=40, units=3)
    unit_curves = UnitCurves.from_images(curves)
    for value, min_tokens, max_tokens in ((0.5, 3, None), (0.02, 1, 20), (1.0, 8, 30)):
        instance = rule_for(rule, 12, min_tokens, max_tokens=max_tokens, **{rule.calibrated_setting: value})
        expected = [sum(int(instance.budgets_from_curves(unit[None])) for unit in units) for units in curves]
        assert unit_curves.budgets(instance).tolist() == expected
    assert unit_curves.tokens_per_image == (128, 128, 128, 120, 120)


@pytest.mark.parametrize("rule", CALIBRATED_RULES, ids=lambda rule: rule.name)
@pytest.mark.parametrize("target", [4.37, 9.6, 15.37, 21.0])
@pytest.mark.parametrize("units", [1, 3])
def test_calibrated_mean_meets_target_and_is_the_closest(
    rule: type[SpectralBudgetRule], target: float, units: int
) -> None:
    """Targets across the reachable range, off the integers: the closest mean any value of the setting gives."""
    curves = UnitCurves.from_images(random_curves(2, 12, units=units))
    instance = rule_for(rule, target, 1, units)
    result = calibrate(instance, curves, target)
    assert 0 < result.value <= 1
    assert result.settings[rule.calibrated_setting] == result.value
    assert abs(result.mean_tokens - target) <= 1
    calibrated = replace(instance, **result.settings)
    assert list(result.budgets) == curves.budgets(calibrated).tolist()
    achievable = {
        float(curves.budgets(replace(instance, **{rule.calibrated_setting: float(value)})).double().mean())
        for value in curves.breakpoints(instance)
    }
    assert max(achievable) - min(achievable) > 10
    assert abs(result.mean_tokens - target) == pytest.approx(min(abs(mean - target) for mean in achievable))


@pytest.mark.parametrize("rule", CALIBRATED_RULES, ids=lambda rule: rule.name)
def test_calibrated_value_is_strictly_inside_its_interval(rule: type[SpectralBudgetRule]) -> None:
    """Curves recomputed one ulp up or down give the same budgets: the value sits away from every breakpoint."""
    images = random_curves(3, 10)
    instance = rule_for(rule, 20, 1)
    result = calibrate(instance, UnitCurves.from_images(images), 20)
    calibrated = replace(instance, **result.settings)
    for direction in (0.0, 2.0):
        nudged = [[torch.nextafter(curve, torch.full_like(curve, direction)) for curve in units] for units in images]
        assert UnitCurves.from_images(nudged).budgets(calibrated).tolist() == list(result.budgets)


def test_marginal_calibration_is_the_water_filling_allocation() -> None:
    """Greedy water-filling over the calibration images (float64: repeatedly give a token to the image whose next
    component holds the largest share of its energy) spends the calibrated total exactly as the marginal rule at
    the calibrated lambda does, image by image: the allocation that keeps the largest sum of energy fractions."""
    images = random_curves(5, 16)
    curves = UnitCurves.from_images(images)
    result = calibrate(MarginalBudget(min_tokens=1), curves, 14)
    shares = [np.diff(units[0].double().numpy(), prepend=0.0) for units in images]
    owners = np.concatenate([np.full(len(image_shares), image) for image, image_shares in enumerate(shares)])
    order = np.argsort(-np.concatenate(shares), kind="stable")
    allocation = np.bincount(owners[order[: sum(result.budgets)]], minlength=len(images))
    assert allocation.tolist() == list(result.budgets)


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
    for rule in (EnergyBudget(min_tokens=4), MarginalBudget(min_tokens=4)):
        with pytest.raises(CalibrationError, match=r"out of reach .* ranges from \d+\.\d\d to \d+\.\d\d over every"):
            calibrate(rule, curves, target)


def test_target_between_large_steps_is_refused() -> None:
    """One image whose curve is flat over four tokens: its budget jumps from 1 to 5, so a mean of 3 is unreachable."""
    curve = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0])
    curves = UnitCurves.from_images([[curve]])
    with pytest.raises(
        CalibrationError, match="energy_ratio gives a mean within one token of 3: the mean budget jumps"
    ):
        calibrate(EnergyBudget(min_tokens=1), curves, 3)
    assert calibrate(EnergyBudget(min_tokens=1), curves, 4.5).budgets == (5,)


def test_a_rule_without_a_calibrated_setting_is_refused() -> None:
    curves = UnitCurves.from_images(random_curves(4, 6))
    with pytest.raises(CalibrationError, match="budget rule 'fixed' declares no way to meet a target mean"):
        settings_for_target(type("Unmeetable", (FixedBudget,), {"target_setting": None, "name": "fixed"}), curves, 8, 1)
    settings, calibration = settings_for_target(FixedBudget, curves, 8.4, 1)
    assert settings == {"budget_mode": "fixed", "fixed_tokens": 8} and calibration is None


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
