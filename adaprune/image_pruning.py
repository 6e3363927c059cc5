"""One batched step from per-image features to per-image budgets and kept tokens (no model involved)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .configuration_adaprune import PruningSettings
from .spectral_budget import budgets_from_curves, energy_curves
from .token_selection import get_selector, kept_indices_from_mask


@dataclass(frozen=True)
class ImagePruning:
    """Budgets (n,) and ascending kept indices (one tensor per image) for n images of N tokens each."""

    token_budgets: torch.LongTensor
    kept_indices: list[torch.LongTensor]
    padded_kept_indices: torch.LongTensor

    def kept_rows(self, features: torch.Tensor) -> list[torch.Tensor]:
        """The kept rows of (n, N, D) features, one (k_i, D) tensor per image."""
        index = self.padded_kept_indices.clamp_max(features.shape[1] - 1)
        gathered = torch.gather(features, 1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        return [gathered[image, : len(kept)] for image, kept in enumerate(self.kept_indices)]


def compute_budgets(spectrum_features: torch.Tensor, settings: PruningSettings) -> torch.LongTensor:
    """Per-image budgets for (n, N, d) features under the settings' budget mode."""
    n_images, n_tokens = spectrum_features.shape[:2]
    if settings.budget_mode == "fixed":
        return torch.full((n_images,), min(settings.fixed_tokens, n_tokens), device=spectrum_features.device)
    curves = energy_curves(
        spectrum_features,
        center=settings.center_spectrum,
        solver=settings.spectrum_solver,
        randomized_rank=settings.randomized_rank,
        randomized_oversampling=settings.randomized_oversampling,
        randomized_power_iterations=settings.randomized_power_iterations,
    )
    return budgets_from_curves(
        curves, settings.energy_ratio, min_tokens=settings.min_tokens, max_tokens=settings.max_tokens
    )


def prune_images(
    spectrum_features: torch.Tensor,
    signals: dict[str, torch.Tensor],
    settings: PruningSettings,
    checked_features: tuple[torch.Tensor, ...] = (),
) -> ImagePruning:
    """Budgets and kept tokens for (n, N, d) features, with one host sync for the whole batch.

    `signals` holds what the selector needs besides the features. Every tensor in `checked_features`
    (n, N, ...) is checked for NaN/Inf along with the spectrum features; a bad image raises ValueError.
    """
    spectrum_features = spectrum_features.detach()
    finite = torch.stack(
        [tensor.detach().isfinite().flatten(1).all(-1) for tensor in (spectrum_features, *checked_features)]
    ).all(0)
    budgets = compute_budgets(torch.nan_to_num(spectrum_features), settings)
    keep = get_selector(settings.selector).keep_mask({"features": spectrum_features, **signals}, budgets)

    host_budgets, host_finite = torch.stack([budgets, finite.long()]).tolist()
    bad_images = [index for index, ok in enumerate(host_finite) if not ok]
    if bad_images:
        raise ValueError(
            f"images {bad_images} (0-based, in batch order) have non-finite visual features (NaN or Inf); "
            "check their pixel_values, and for float16 models try bfloat16 or float32"
        )
    padded, kept_indices = kept_indices_from_mask(keep, host_budgets)
    return ImagePruning(token_budgets=budgets, kept_indices=kept_indices, padded_kept_indices=padded)
