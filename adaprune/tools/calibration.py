"""Calibrating a budget rule to a target mean token budget (pure tensor and number functions).

The paper compares methods "under matched average token budgets": a user who wants 64 tokens per image on average
needs the setting (E-AdaPrune's tau, the marginal rule's lambda, ...) at which the mean budget over their images is
64. An image's budget is the sum over its budget units (one for LLaVA; crops for LLaVA-NeXT) of the rule's clamped
budgets from the units' energy curves, exactly as the model computes them. As a function of the calibrated setting
that budget is a monotone step function which only changes at the rule's `calibration_values` of the curves (the
curve values for tau, the components' energy shares for lambda): it is constant on every interval (v_prev, v]
between consecutive distinct values. So the search runs over those intervals, not over floats, and the value it
returns lies strictly inside its interval (a short decimal where one fits), so that round-off in a recomputed curve
cannot move a budget. A rule with a `target_setting` as well (a blend with a fixed budget) gets the target there
first.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adaprune.settings import BudgetRule
from adaprune.spectral_rules import SpectralBudgetRule

PERCENTILES = (10, 25, 50, 75, 90)
MAX_DECIMALS = 9


class CalibrationError(ValueError):
    """The target cannot be met (out of the reachable range, or not within one token)."""


@dataclass(frozen=True)
class UnitCurves:
    """Energy curves of many images, grouped by unit length so each group's budgets are one tensor operation.

    groups: per distinct unit length N, the (u, N) curves of those units and the (u,) image index of each.
    n_images: number of images; tokens_per_image: each image's unpruned token count (sum of its units' N).
    """

    groups: tuple[tuple[torch.Tensor, torch.LongTensor], ...]
    n_images: int
    tokens_per_image: tuple[int, ...]

    def per_unit(self, tokens_per_image: float) -> int:
        """A per-image token count spread evenly over the mean number of units per image, rounded (at least 1):
        what a per-unit setting such as fixed_tokens takes to meet a per-image target."""
        n_units = sum(len(owners) for _, owners in self.groups)
        return max(1, round(tokens_per_image * self.n_images / n_units))

    @classmethod
    def from_images(cls, curves: Sequence[Sequence[torch.Tensor]]) -> UnitCurves:
        """From per image, the energy curve of each of its units (as `image_energy_curves` returns them)."""
        if not curves:
            raise CalibrationError("no images to calibrate on")
        by_length: dict[int, tuple[list[torch.Tensor], list[int]]] = {}
        for image, units in enumerate(curves):
            if not units:
                raise CalibrationError(f"image {image} has no energy curves")
            for curve in units:
                rows, owners = by_length.setdefault(curve.shape[-1], ([], []))
                rows.append(curve.detach().to("cpu").reshape(-1))
                owners.append(image)
        groups = tuple((torch.stack(rows), torch.tensor(owners)) for rows, owners in by_length.values())
        tokens = tuple(sum(curve.shape[-1] for curve in units) for units in curves)
        return cls(groups=groups, n_images=len(curves), tokens_per_image=tokens)

    def budgets(self, rule: SpectralBudgetRule) -> torch.LongTensor:
        """Each image's budget under `rule`: (n_images,), the sum of its units' budgets."""
        totals = torch.zeros(self.n_images, dtype=torch.long)
        for rows, owners in self.groups:
            totals.index_add_(0, owners, rule.budgets_from_curves(rows))
        return totals

    def breakpoints(self, rule: SpectralBudgetRule) -> torch.Tensor:
        """The distinct values of the rule's calibrated setting in (0, 1] at which a budget changes, ascending."""
        values = torch.cat([rule.calibration_values(rows).flatten() for rows, _ in self.groups]).unique()
        return values[(values > 0) & (values <= 1)]


@dataclass(frozen=True)
class Calibration:
    """The calibrated setting, the settings that run the rule at the target (the calibrated one among them), the
    budgets they give each image, and their statistics."""

    rule: str
    setting: str
    value: float
    settings: dict[str, Any]
    target_mean_tokens: float
    budgets: tuple[int, ...]
    tokens_per_image: tuple[int, ...]
    min_tokens: int
    max_tokens: int | None

    @property
    def mean_tokens(self) -> float:
        return sum(self.budgets) / len(self.budgets)

    def statistics(self) -> dict[str, float | int | None]:
        """Target, the rule and its settings, and the spread of the per-image budgets, as JSON-ready numbers."""
        return {
            "target_mean_tokens": self.target_mean_tokens,
            "budget_mode": self.rule,
            "calibrated_setting": self.setting,
            **self.settings,
            "n_images": len(self.budgets),
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens,
            **budget_statistics(self.budgets, self.tokens_per_image),
        }


def budget_statistics(budgets: Sequence[int], tokens_per_image: Sequence[int]) -> dict[str, float]:
    """Mean, min, max, percentiles of the budgets and the mean kept fraction of the images' tokens."""
    values = torch.tensor(list(budgets), dtype=torch.float64)
    quantiles = torch.quantile(values, torch.tensor(PERCENTILES, dtype=torch.float64) / 100).tolist()
    kept = values / torch.tensor(list(tokens_per_image), dtype=torch.float64)
    return {
        "mean": float(values.mean()),
        "min": int(values.min()),
        "max": int(values.max()),
        **{f"p{percent}": float(value) for percent, value in zip(PERCENTILES, quantiles)},
        "mean_kept_fraction": float(kept.mean()),
    }


def ratio_inside(lower: float, upper: float, dtype: torch.dtype) -> float:
    """A tau in (lower, upper] that stays there when cast to the curves' dtype (`budgets_from_curves` compares in
    that dtype): the shortest decimal near the interval's middle, else `upper` itself."""
    middle = (lower + upper) / 2
    for decimals in range(1, MAX_DECIMALS + 1):
        candidate = round(middle, decimals)
        if lower < float(torch.tensor(candidate, dtype=dtype)) <= upper and candidate <= 1:
            return candidate
    return upper


def calibrate(rule: SpectralBudgetRule, curves: UnitCurves, target_mean_tokens: float) -> Calibration:
    """The value of the rule's `calibrated_setting` whose mean budget over the images is closest to
    `target_mean_tokens` (within one token), with the rule's `target_setting` (if any) set to the target first
    (per budget unit: spread over the images' mean number of units).

    Binary search over the breakpoints (the mean budget is monotone in the setting). Raises CalibrationError when
    the target lies outside the reachable range or when no value comes within one token of it (budgets jump in
    large steps, e.g. with very few images)."""
    setting = rule.calibrated_setting
    if setting is None:
        raise CalibrationError(f"budget rule {rule.name!r} has no calibrated setting")
    if rule.target_setting is not None:
        rule = dataclasses.replace(rule, **{rule.target_setting: curves.per_unit(target_mean_tokens)})
    breakpoints = curves.breakpoints(rule)
    if len(breakpoints) == 0:
        raise CalibrationError(f"the images' curves give {setting} no value in (0, 1] at which a budget changes")

    def at(index: int) -> SpectralBudgetRule:
        return dataclasses.replace(rule, **{setting: float(breakpoints[index])})

    # Positions along which the mean budget never decreases.
    order = list(range(len(breakpoints)))
    if not rule.calibration_increasing:
        order.reverse()

    @functools.cache
    def mean_at(position: int) -> float:
        return float(curves.budgets(at(order[position])).double().mean())

    last = len(order) - 1
    lowest, highest = mean_at(0), mean_at(last)
    if not lowest - 1 <= target_mean_tokens <= highest + 1:
        raise CalibrationError(
            f"target mean {target_mean_tokens:g} tokens is out of reach for these images with budget_mode "
            f"{rule.name!r}: the mean budget ranges from {lowest:.2f} to {highest:.2f} over every {setting} in (0, 1] "
            f"(min_tokens={rule.min_tokens}, max_tokens={rule.max_tokens}); choose a target in that range or change "
            "min_tokens/max_tokens"
        )
    low, high = 0, last  # invariant: mean_at(high) >= target, or high is the last position
    while low < high:
        middle = (low + high) // 2
        if mean_at(middle) >= target_mean_tokens:
            high = middle
        else:
            low = middle + 1
    candidates = [position for position in (high - 1, high) if position >= 0]
    best = min(candidates, key=lambda position: abs(mean_at(position) - target_mean_tokens))
    if abs(mean_at(best) - target_mean_tokens) > 1:
        raise CalibrationError(
            f"no {setting} gives a mean within one token of {target_mean_tokens:g}: the mean budget jumps from "
            f"{mean_at(high - 1):.2f} to {mean_at(high):.2f} there; calibrate on more images or choose a nearby target"
        )
    index = order[best]
    lower = float(breakpoints[index - 1]) if index > 0 else 0.0
    value = ratio_inside(lower, float(breakpoints[index]), breakpoints.dtype)
    calibrated = dataclasses.replace(rule, **{setting: value})
    settings = {name: getattr(calibrated, name) for name in (rule.target_setting, setting) if name is not None}
    return Calibration(
        rule=rule.name,
        setting=setting,
        value=value,
        settings=settings,
        target_mean_tokens=target_mean_tokens,
        budgets=tuple(curves.budgets(calibrated).tolist()),
        tokens_per_image=curves.tokens_per_image,
        min_tokens=rule.min_tokens,
        max_tokens=rule.max_tokens,
    )


def settings_for_target(
    rule: type[BudgetRule], curves: UnitCurves, target_mean_tokens: float, min_tokens: int
) -> tuple[dict[str, Any], Calibration | None]:
    """The settings that run budget rule `rule` at a mean of `target_mean_tokens` tokens per image on these images
    (`budget_mode` included), and the calibration when one was needed. Raises CalibrationError for a rule that
    declares no way to meet a target."""
    if rule.calibrated_setting is not None and issubclass(rule, SpectralBudgetRule):
        calibration = calibrate(rule(min_tokens=min_tokens), curves, target_mean_tokens)
        return {"budget_mode": rule.name, **calibration.settings}, calibration
    if rule.target_setting is not None:
        return {"budget_mode": rule.name, rule.target_setting: curves.per_unit(target_mean_tokens)}, None
    raise CalibrationError(
        f"budget rule {rule.name!r} declares no way to meet a target mean (target_setting or calibrated_setting)"
    )
