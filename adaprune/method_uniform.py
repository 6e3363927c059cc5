"""The uniform selector: tokens evenly spaced over the patch grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .settings import TokenSelector
from .token_selection import evenly_spaced_mask


@dataclass(frozen=True)
class UniformSelector(TokenSelector):
    """Tokens evenly spaced over the patch grid in raster order: a content-blind baseline (the spatial-sampling
    control of the pruning literature)."""

    name: ClassVar[str] = "uniform"

    def keep_mask(self, signals: dict[str, torch.Tensor], budgets: torch.Tensor) -> torch.Tensor:
        return evenly_spaced_mask(signals["features"].shape[-2], budgets)
