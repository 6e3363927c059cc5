"""One batched step from features to token budgets and kept tokens (no model involved).

The unit of pruning is a *budget unit*: a set of visual tokens that gets one spectrum and one budget (a LLaVA
image; a LLaVA-NeXT image or one of its crops). Units of equal token count are stacked into a `UnitGroup` and
pruned together; `prune_groups` handles any number of groups with one host sync for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .configuration_adaprune import PruningSettings
from .token_selection import kept_indices_from_mask


@dataclass(frozen=True)
class ImagePruning:
    """Budgets (n,) and ascending kept indices (one tensor per unit) for n units of N tokens each.

    With an in-LLM selector the kept indices are the vision stage's (every token, unless a vision stage is
    composed) and the budgets what the in-LLM selector keeps among them."""

    token_budgets: torch.LongTensor
    kept_indices: list[torch.LongTensor]
    padded_kept_indices: torch.LongTensor

    def kept_rows(self, features: torch.Tensor) -> list[torch.Tensor]:
        """The kept rows of (n, N, D) features, one (k_i, D) tensor per unit."""
        index = self.padded_kept_indices.clamp_max(features.shape[1] - 1)
        gathered = torch.gather(features, 1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        return [gathered[unit, : len(kept)] for unit, kept in enumerate(self.kept_indices)]


@dataclass(frozen=True)
class UnitGroup:
    """Budget units with the same token count N, pruned as one batch.

    spectrum_features: (n, N, d) features whose spectra set the budgets.
    signals: what the selector needs besides the features, each (n, N, ...).
    checked_features: further (n, N, ...) tensors checked for NaN/Inf along with the spectrum features.
    images: the image each unit belongs to, for error messages (default: unit i is image i).
    """

    spectrum_features: torch.Tensor
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    checked_features: tuple[torch.Tensor, ...] = ()
    images: Sequence[int] | None = None


def _budgets_keep_finite(
    group: UnitGroup, settings: PruningSettings
) -> tuple[torch.LongTensor, torch.LongTensor, torch.BoolTensor, torch.BoolTensor]:
    """Device-side part of pruning one group: final budgets (n,), vision-stage budgets (n,), the vision stage's keep
    mask (n, N) and finiteness flags (n,)."""
    spectrum_features = group.spectrum_features.detach()
    finite = torch.stack(
        [tensor.detach().isfinite().flatten(1).all(-1) for tensor in (spectrum_features, *group.checked_features)]
    ).all(0)
    budgets = settings.budget_rule.budgets(torch.nan_to_num(spectrum_features))
    n_units, n_tokens = spectrum_features.shape[:2]
    vision_budgets = settings.vision_stage_budgets(budgets, n_tokens)
    selector = settings.vision_selector
    if selector is None:
        keep = torch.ones(n_units, n_tokens, dtype=torch.bool, device=spectrum_features.device)
    else:
        keep = selector.keep_mask({"features": spectrum_features, **group.signals}, vision_budgets)
    return budgets.clamp_max(vision_budgets), vision_budgets, keep, finite


def prune_groups(groups: Sequence[UnitGroup], settings: PruningSettings) -> list[ImagePruning]:
    """Budgets and kept tokens for every group, reading device values on the host once for all groups.

    Raises ValueError naming the images whose features hold NaN or Inf.
    """
    device_parts = [_budgets_keep_finite(group, settings) for group in groups]
    if not device_parts:
        return []
    host_kept, host_finite = torch.cat(
        [torch.stack([vision_budgets, finite.long()]) for _, vision_budgets, _, finite in device_parts], dim=1
    ).tolist()
    unit_images = [
        image
        for group in groups
        for image in (group.images if group.images is not None else range(len(group.spectrum_features)))
    ]
    bad_images = sorted({image for image, ok in zip(unit_images, host_finite) if not ok})
    if bad_images:
        raise ValueError(
            f"images {bad_images} (0-based, in batch order) have non-finite visual features (NaN or Inf); "
            "check their pixel_values, and for float16 models try bfloat16 or float32"
        )
    prunings, start = [], 0
    for budgets, _, keep, _ in device_parts:
        group_kept = host_kept[start : start + len(budgets)]
        start += len(budgets)
        padded, kept_indices = kept_indices_from_mask(keep, group_kept)
        prunings.append(ImagePruning(token_budgets=budgets, kept_indices=kept_indices, padded_kept_indices=padded))
    return prunings


def prune_images(
    spectrum_features: torch.Tensor,
    signals: dict[str, torch.Tensor],
    settings: PruningSettings,
    checked_features: tuple[torch.Tensor, ...] = (),
) -> ImagePruning:
    """Budgets and kept tokens for n images of N tokens each ((n, N, d) features), with one host sync."""
    return prune_groups([UnitGroup(spectrum_features, signals, checked_features)], settings)[0]
