"""FastV: keep the visual tokens the prompt's last token attends to most, inside the language model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .settings import SingleCutSelector
from .token_selection import top_k_mask


@dataclass(frozen=True)
class FastVSelector(SingleCutSelector):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764): from decoder
    layer K (default 2) on, keep each image's budget of visual tokens with the highest attention from the prompt's
    last token at layer K - 1, averaged over heads; the others leave the sequence and the KV cache."""

    name: ClassVar[str] = "fastv"

    def keep_mask(self, signals: dict[str, torch.Tensor], budgets: torch.Tensor) -> torch.Tensor:
        return top_k_mask(signals["prompt_attention"], budgets)
