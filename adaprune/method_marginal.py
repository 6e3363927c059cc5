"""The marginal budget rule: each budget unit keeps the components that hold at least a share lambda of its energy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .settings import is_number, setting
from .spectral_budget import budgets_from_shares, component_shares
from .spectral_rules import SpectralBudgetRule


@dataclass(frozen=True)
class MarginalBudget(SpectralBudgetRule):
    """Equal marginal value per token: a unit keeps one token per spectral component holding at least
    marginal_share (lambda) of its energy, clamped to [min_tokens, max_tokens].

    Spending a total budget over many images so that the sum of their kept energy fractions is largest is a
    separable concave allocation; greedy marginal analysis solves it exactly (B. Fox, "Discrete optimization via
    marginal analysis", Management Science 13(3), 1966) and ends with every image keeping the components above one
    common share: the reverse water-filling of parallel Gaussian sources (Cover & Thomas, Elements of Information
    Theory, 2nd ed., 10.3.3). Calibrating lambda on a calibration set therefore gives each image, on its own, its
    share of the allocation that keeps the most energy there. Unlike one tau (the same fraction of every image's
    energy), a plain image whose few components each hold much energy keeps all of them, and a busy image stops
    where a token adds less than lambda."""

    name: ClassVar[str] = "marginal"
    calibrated_setting: ClassVar[str | None] = "marginal_share"
    calibration_increasing: ClassVar[bool] = False

    marginal_share: float = setting(
        0.01,
        "lambda in (0, 1]: with budget_mode 'marginal', keep one token per spectral component holding at least this "
        "share of its image's (LLaVA-NeXT: budget unit's) energy",
        check=lambda value: is_number(value) and 0 < value <= 1,
        expected="a number in (0, 1]",
    )

    def budgets_from_curves(self, curves: torch.Tensor) -> torch.LongTensor:
        return budgets_from_shares(curves, self.marginal_share, min_tokens=self.min_tokens, max_tokens=self.max_tokens)

    def calibration_values(self, curves: torch.Tensor) -> torch.Tensor:
        return component_shares(curves)
