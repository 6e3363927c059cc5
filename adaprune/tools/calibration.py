"""Calibrating the energy ratio tau to a target mean token budget (pure tensor and number functions).

The paper compares methods "under matched average token budgets": a user who wants 64 tokens per image on average
needs the tau at which the mean budget over their images is 64. An image's budget at tau is the sum over its budget
units (one for LLaVA; crops for LLaVA-NeXT) of `budgets_from_curves` with the min/max clamp, exactly as the model
computes it. As a function of tau that budget is a non-decreasing step function which only changes at the curve
values themselves: it is constant on every interval (c_prev, c] between consecutive distinct curve values. So the
search runs over those intervals, not over floats, and the tau it returns lies strictly inside its interval (a
short decimal where one fits), so that round-off in a recomputed curve cannot move a budget.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adaprune.settings import BudgetRule
from adaprune.spectral_budget import budgets_from_curves

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

    def budgets(self, energy_ratio: float, min_tokens: int, max_tokens: int | None = None) -> torch.LongTensor:
        """Each image's budget at `energy_ratio`: (n_images,), the sum of its units' clamped budgets."""
        totals = torch.zeros(self.n_images, dtype=torch.long)
        for rows, owners in self.groups:
            unit_budgets = budgets_from_curves(rows, energy_ratio, min_tokens=min_tokens, max_tokens=max_tokens)
            totals.index_add_(0, owners, unit_budgets)
        return totals

    def breakpoints(self) -> torch.Tensor:
        """The distinct curve values in (0, 1], ascending: the budgets change only there."""
        values = torch.cat([rows.flatten() for rows, _ in self.groups]).unique()
        return values[(values > 0) & (values <= 1)]


@dataclass(frozen=True)
class Calibration:
    """The calibrated tau, the budgets it gives each image, and their statistics."""

    energy_ratio: float
    target_mean_tokens: float
    budgets: tuple[int, ...]
    tokens_per_image: tuple[int, ...]
    min_tokens: int
    max_tokens: int | None

    @property
    def mean_tokens(self) -> float:
        return sum(self.budgets) / len(self.budgets)

    def statistics(self) -> dict[str, float | int | None]:
        """Target, tau and the spread of the per-image budgets, as JSON-ready numbers."""
        return {
            "target_mean_tokens": self.target_mean_tokens,
            "energy_ratio": self.energy_ratio,
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


def calibrate_energy_ratio(
    curves: UnitCurves, target_mean_tokens: float, min_tokens: int, max_tokens: int | None = None
) -> Calibration:
    """The tau whose mean budget over the images is closest to `target_mean_tokens` (within one token).

    Binary search over the curve values (the mean budget is non-decreasing in tau). Raises CalibrationError when
    the target lies outside the reachable range (every image at its minimum, to every image at tau = 1) or when no
    tau comes within one token of it (budgets jump in large steps, e.g. with very few images).
    """
    breakpoints = curves.breakpoints()

    @functools.cache
    def mean_at(index: int) -> float:
        return float(curves.budgets(float(breakpoints[index]), min_tokens, max_tokens).double().mean())

    lowest, highest = mean_at(0), mean_at(len(breakpoints) - 1)
    if not lowest - 1 <= target_mean_tokens <= highest + 1:
        raise CalibrationError(
            f"target mean {target_mean_tokens:g} tokens is out of reach for these images: the mean budget ranges "
            f"from {lowest:.2f} (every image at its smallest budget, min_tokens={min_tokens}) to {highest:.2f} "
            "(energy_ratio=1, the numerical rank); choose a target in that range or change min_tokens/max_tokens"
        )
    low, high = 0, len(breakpoints) - 1  # invariant: mean_at(high) >= target, or high is the last breakpoint
    while low < high:
        middle = (low + high) // 2
        if mean_at(middle) >= target_mean_tokens:
            high = middle
        else:
            low = middle + 1
    candidates = [index for index in (high - 1, high) if index >= 0]
    best = min(candidates, key=lambda index: abs(mean_at(index) - target_mean_tokens))
    if abs(mean_at(best) - target_mean_tokens) > 1:
        raise CalibrationError(
            f"no energy ratio gives a mean within one token of {target_mean_tokens:g}: the mean budget jumps from "
            f"{mean_at(high - 1):.2f} to {mean_at(high):.2f} there; calibrate on more images or choose a nearby target"
        )
    lower = float(breakpoints[best - 1]) if best > 0 else 0.0
    energy_ratio = ratio_inside(lower, float(breakpoints[best]), breakpoints.dtype)
    budgets = curves.budgets(energy_ratio, min_tokens, max_tokens)
    return Calibration(
        energy_ratio=energy_ratio,
        target_mean_tokens=target_mean_tokens,
        budgets=tuple(budgets.tolist()),
        tokens_per_image=curves.tokens_per_image,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
    )


def settings_for_target(
    rule: type[BudgetRule], curves: UnitCurves, target_mean_tokens: float, min_tokens: int
) -> tuple[dict[str, float | int], Calibration | None]:
    """The settings that run budget rule `rule` at a mean of `target_mean_tokens` tokens per image on these images
    (`budget_mode` included), and the calibration when one was needed. Raises CalibrationError for a rule that
    declares no way to meet a target."""
    if rule.target_setting is not None:
        return {"budget_mode": rule.name, rule.target_setting: round(target_mean_tokens)}, None
    if rule.calibrated_setting == "energy_ratio":
        calibration = calibrate_energy_ratio(curves, target_mean_tokens, min_tokens)
        return {"budget_mode": rule.name, "energy_ratio": calibration.energy_ratio}, calibration
    raise CalibrationError(
        f"budget rule {rule.name!r} declares no way to meet a target mean (target_setting or calibrated_setting)"
    )
