"""E-AdaPrune's budget rule: each budget unit keeps the smallest k whose top singular values hold a fraction tau
of its spectral energy (arXiv 2603.05950)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .method_fixed import FixedBudget
from .settings import is_number, setting
from .spectral_budget import budgets_from_curves
from .spectral_rules import SpectralBudgetRule


@dataclass(frozen=True)
class EnergyBudget(SpectralBudgetRule):
    """E-AdaPrune (Energy-guided adaptive pruning, arXiv 2603.05950): a unit's budget is the smallest k with
    E(k) >= energy_ratio, clamped to [min_tokens, max_tokens]; plain images keep few tokens, dense ones many.
    One tau gives every image the same fraction of its energy."""

    name: ClassVar[str] = "energy"
    calibrated_setting: ClassVar[str | None] = "energy_ratio"

    energy_ratio: float = setting(
        0.9,
        "tau in (0, 1]: the kept rank must hold this fraction of the spectral energy (sum of squared singular values)",
        check=lambda value: is_number(value) and 0 < value <= 1,
        expected="a number in (0, 1]",
    )

    def budgets_from_curves(self, curves: torch.Tensor) -> torch.LongTensor:
        return budgets_from_curves(curves, self.energy_ratio, min_tokens=self.min_tokens, max_tokens=self.max_tokens)

    def calibration_values(self, curves: torch.Tensor) -> torch.Tensor:
        return curves


@dataclass(frozen=True)
class TargetedEnergyBudget(EnergyBudget, FixedBudget):
    """Base of the rules that shape E-AdaPrune's budget around a target mean ('floor', 'blend'): fixed_tokens is
    that mean; calibration sets it to the target and then finds the tau that meets it."""

    target_setting: ClassVar[str | None] = "fixed_tokens"
    calibrated_setting: ClassVar[str | None] = "energy_ratio"
