"""The floor budget rule: E-AdaPrune's budget, but never below a fraction of the target mean."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .method_energy import TargetedEnergyBudget
from .settings import is_number, setting
from .spectral_budget import budgets_from_curves


@dataclass(frozen=True)
class FloorBudget(TargetedEnergyBudget):
    """E-AdaPrune's budget with a floor that scales with the target: max(ceil(f * fixed_tokens), k_tau), where
    k_tau is the smallest k with E(k) >= energy_ratio, clamped to [min_tokens, max_tokens].

    A fixed min_tokens is too high at generous means and too low at tight ones; a floor at a fraction f of the
    target mean keeps plain images answerable at any mean (the project's own design, after the loss of one tau at
    tight means on sparse images)."""

    name: ClassVar[str] = "floor"

    floor_fraction: float = setting(
        0.5,
        "f in (0, 1]: with budget_mode 'floor', no budget unit keeps fewer than ceil(f * fixed_tokens) tokens",
        check=lambda value: is_number(value) and 0 < value <= 1,
        expected="a number in (0, 1]",
    )

    def budgets_from_curves(self, curves: torch.Tensor) -> torch.LongTensor:
        # Rounded first so that a product like 0.14 * 50 = 7.000000000000001 gives 7, not 8.
        floor = max(self.min_tokens, math.ceil(round(self.floor_fraction * self.fixed_tokens, 9)))
        return budgets_from_curves(curves, self.energy_ratio, min_tokens=floor, max_tokens=self.max_tokens)
