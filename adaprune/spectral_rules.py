"""What every spectral budget rule shares: how a unit's energy curve is computed, the min/max clamp, and the
interface calibration uses to meet a target mean (`budgets_from_curves`, `calibration_values`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .settings import BudgetRule, Settings, check_setting, setting
from .spectral_budget import energy_curves


@dataclass(frozen=True)
class SpectrumSettings(Settings):
    """Which features give a unit's spectrum, and how it is computed."""

    spectrum_source: str = setting(
        "vision",
        "the matrix whose spectrum is taken: 'vision' (the vision tower's selected-layer patch features, i.e. the "
        "projector's input, N x 1024 for LLaVA-1.5) or 'projected' (the projector's output)",
        choices=("vision", "projected"),
    )
    center_spectrum: bool = setting(
        True,
        "subtract the image's mean token first (PCA-style); CLIP features share a large mean component that, "
        "uncentred, takes most of the energy and gives every image a similar small budget",
    )
    spectrum_solver: str = setting(
        "exact",
        "'exact' (every eigenvalue of the N x N Gram matrix, in float32) or 'randomized' (the top randomized_rank "
        "singular values by a range finder; total energy from the Frobenius norm)",
        choices=("exact", "randomized"),
    )
    randomized_rank: int = setting(128, "singular values the randomized solver computes", minimum=1)
    randomized_oversampling: int = setting(16, "extra sketch columns of the randomized solver", minimum=0)
    randomized_power_iterations: int = setting(2, "power iterations of the randomized solver", minimum=0)

    def curves(self, spectrum_features: torch.Tensor) -> torch.Tensor:
        """Energy curves E(k) of (n, N, d) features under these settings: (n, N) float32."""
        return energy_curves(
            spectrum_features,
            center=self.center_spectrum,
            solver=self.spectrum_solver,
            randomized_rank=self.randomized_rank,
            randomized_oversampling=self.randomized_oversampling,
            randomized_power_iterations=self.randomized_power_iterations,
        )


@dataclass(frozen=True)
class SpectralBudgetRule(SpectrumSettings, BudgetRule):
    """A budget rule that reads only each unit's energy curve E(k) (`budgets_from_curves`), clamped to
    [min_tokens, max_tokens].

    Its `calibrated_setting` is a number the budgets never decrease in (`calibration_increasing`) or never increase
    in; budgets change only at `calibration_values` of the curves, so they are constant on every interval
    (v_prev, v] between consecutive distinct values, which calibration searches instead of floats."""

    calibration_increasing: ClassVar[bool] = True

    min_tokens: int = setting(16, "smallest budget of an image (LLaVA-NeXT: of a budget unit)", minimum=1)
    max_tokens: int | None = setting(
        None, "largest budget of an image (LLaVA-NeXT: of a budget unit); None: its token count", minimum=1
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_setting(
            "max_tokens",
            self.max_tokens is None or self.max_tokens >= self.min_tokens,
            f"None or an integer >= min_tokens ({self.min_tokens})",
            self.max_tokens,
        )

    def budgets(self, spectrum_features: torch.Tensor) -> torch.LongTensor:
        return self.budgets_from_curves(self.curves(spectrum_features))

    def budgets_from_curves(self, curves: torch.Tensor) -> torch.LongTensor:
        """Per-unit budgets (n,) from the units' (n, N) energy curves."""
        raise NotImplementedError

    def calibration_values(self, curves: torch.Tensor) -> torch.Tensor:
        """The values of `calibrated_setting` at which a budget of these (n, N) curves changes (any shape)."""
        raise NotImplementedError
