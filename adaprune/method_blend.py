"""The blend budget rule: half way (or any weight) between the fixed budget and E-AdaPrune's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .method_energy import TargetedEnergyBudget
from .settings import is_number, setting
from .spectral_budget import budgets_from_curves, clamped_budgets


@dataclass(frozen=True)
class BlendBudget(TargetedEnergyBudget):
    """A convex blend of the fixed and the adaptive budget: round(w * fixed_tokens + (1 - w) * k_tau), where k_tau
    is the smallest k with E(k) >= energy_ratio, clamped to [min_tokens, max_tokens].

    Shrinkage towards the fixed budget (the project's own design): every image keeps at least w * fixed_tokens,
    so no plain image falls to min_tokens at a tight mean, while busy images still get more than plain ones.
    At w = 0 it is 'energy', at w = 1 'fixed' (both within [min_tokens, max_tokens])."""

    name: ClassVar[str] = "blend"

    blend_weight: float = setting(
        0.5,
        "w in [0, 1]: with budget_mode 'blend', the weight of fixed_tokens against the adaptive budget at energy_ratio",
        check=lambda value: is_number(value) and 0 <= value <= 1,
        expected="a number in [0, 1]",
    )

    def budgets_from_curves(self, curves: torch.Tensor) -> torch.LongTensor:
        adaptive = budgets_from_curves(curves, self.energy_ratio).double()
        blended = torch.round(self.blend_weight * self.fixed_tokens + (1 - self.blend_weight) * adaptive).long()
        return clamped_budgets(blended, curves.shape[-1], min_tokens=self.min_tokens, max_tokens=self.max_tokens)
