"""The fixed budget: every budget unit keeps the same number of tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .settings import BudgetRule, setting


@dataclass(frozen=True)
class FixedBudget(BudgetRule):
    """One budget for every image, as the fixed-budget methods report (FastV, VisionZip, PDrop at 192/128/64
    tokens); the baseline an adaptive budget is compared with at the same mean."""

    name: ClassVar[str] = "fixed"
    target_setting: ClassVar[str | None] = "fixed_tokens"

    fixed_tokens: int = setting(
        64,
        "budget of every image (or budget unit) with budget_mode 'fixed'; the target mean of 'floor' and 'blend'",
        minimum=1,
    )

    def budgets(self, spectrum_features: torch.Tensor) -> torch.LongTensor:
        n_units, n_tokens = spectrum_features.shape[:2]
        return torch.full((n_units,), min(self.fixed_tokens, n_tokens), device=spectrum_features.device)
