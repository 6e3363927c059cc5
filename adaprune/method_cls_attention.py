"""The [CLS]-attention selector: keep the tokens the vision tower's [CLS] query attends to most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .settings import TokenSelector
from .token_selection import top_k_mask


@dataclass(frozen=True)
class ClsAttentionSelector(TokenSelector):
    """The tokens the [CLS] query attends to most at the feature layer (mean over heads), the importance cue of
    FasterVLM (arXiv 2412.01818) and VisionZip's dominant tokens (arXiv 2412.04467), and E-AdaPrune's selector."""

    name: ClassVar[str] = "cls_attention"
    required_signals: ClassVar[frozenset[str]] = frozenset({"cls_attention"})

    def keep_mask(self, signals: dict[str, torch.Tensor], budgets: torch.Tensor) -> torch.Tensor:
        return top_k_mask(signals["cls_attention"], budgets)
