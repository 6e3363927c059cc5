"""A budget rule defined outside the package, as a user would write one, for tests that register it at run time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from adaprune.settings import BudgetRule, setting


@dataclass(frozen=True)
class HalvingBudget(BudgetRule):
    """A toy budget rule: every unit keeps a fraction of its tokens."""

    name: ClassVar[str] = "toy_halving"

    toy_fraction: float = setting(
        0.5,
        "fraction of its tokens each unit keeps",
        check=lambda value: isinstance(value, float) and 0 < value <= 1,
        expected="a float in (0, 1]",
    )

    def budgets(self, spectrum_features: torch.Tensor) -> torch.LongTensor:
        n_units, n_tokens = spectrum_features.shape[:2]
        count = max(1, int(n_tokens * self.toy_fraction))
        return torch.full((n_units,), count, device=spectrum_features.device)
