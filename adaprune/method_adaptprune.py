"""AdaptPrune: the in-LLM attention cue times a spatial prior, then a soft non-maximum suppression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .settings import SingleCutSelector, positive_number
from .token_selection import PatchGrid


def centred_prior(grid: PatchGrid, sigma: float) -> torch.Tensor:
    """(n, N) an isotropic Gaussian centred on each view of the grid (each LLaVA-NeXT crop its own), peak 1 in each
    unit; `sigma` is a fraction of the view's side (the released code's 12 on 24 x 24 is 0.5)."""
    prior = torch.exp(-grid.centred().pow(2).sum(-1) / (2 * sigma**2))
    return prior / prior.amax(dim=-1, keepdim=True)


def soft_suppression_keep(
    scores: torch.Tensor,
    keys: torch.Tensor,
    grid: PatchGrid,
    budgets: torch.Tensor,
    radius: float,
    distance_sigma: float,
    similarity_sigma: float,
) -> torch.Tensor:
    """Greedy soft non-maximum suppression, batched over images: (n, N) bool, `budgets[i]` tokens per image.

    Each round every image keeps its highest remaining score t, and each token j within `radius` grid cells of t
    (in its view) has its score multiplied by 1 - exp(-d²/(2 distance_sigma²)) exp(-(1 - cos)²/(2
    similarity_sigma²)), where d is the grid distance and cos the cosine of the two tokens' keys. scores: (n, N),
    -inf for tokens that cannot be kept; keys: (n, N, d). One round per kept token of the largest budget, all on
    the device.
    """
    n_images, n_tokens = scores.shape
    unit_keys = torch.nn.functional.normalize(keys.float(), dim=-1)
    remaining = scores.float().clone()
    keep = torch.zeros(n_images, n_tokens, dtype=torch.bool, device=scores.device)
    rows = torch.arange(n_images, device=scores.device)
    for round_index in range(int(budgets.max()) if n_images else 0):
        active = (round_index < budgets).unsqueeze(-1)
        chosen = remaining.argmax(dim=-1)
        keep[rows, chosen] |= active.squeeze(-1)
        cosine = (unit_keys * unit_keys[rows, chosen].unsqueeze(1)).sum(-1)
        distance2 = grid.squared_distances(chosen)
        spatial = torch.exp(-distance2 / (2 * distance_sigma**2)) * (distance2 <= radius**2)
        decay = spatial * torch.exp(-((1 - cosine) ** 2) / (2 * similarity_sigma**2))
        suppressed = remaining * (1 - decay)
        suppressed[rows, chosen] = float("-inf")
        remaining = torch.where(active & torch.isfinite(remaining), suppressed, remaining)
    return keep


@dataclass(frozen=True)
class AdaptPruneSelector(SingleCutSelector):
    """AdaptPrune (Luan et al., "Multi-Cue Adaptive Visual Token Pruning for Large Vision-Language Models", arXiv
    2503.08019; code github.com/bzluan/AdaptPrune): from decoder layer K (default 2) on, keep the tokens chosen by
    a greedy soft non-maximum suppression of the FastV cue (the prompt's last token's attention at layer K - 1,
    head mean) times a centred Gaussian prior on the patch grid, suppressing near tokens (spatial decay) with
    similar keys (layer K's key projection of layer K - 1's output, without input norm or RoPE, as released).

    As released, except that a chosen token is excluded explicitly (the released code relies on its score
    becoming 0, which picks it again when every other score is 0) and the prior's width is a fraction of any grid
    side instead of 12 cells of a 24 x 24 grid. The released code is LLaVA-1.5 only; on LLaVA-NeXT every crop (the
    base crop and each high-resolution crop) is a grid of its own: its own centred prior, and suppression never
    crosses a crop's edge."""

    name: ClassVar[str] = "adaptprune"
    required_signals: ClassVar[frozenset[str]] = frozenset({"prompt_attention", "keys", "grid"})

    adaptprune_prior_sigma: float = positive_number(
        "adaptprune: width of the centred Gaussian prior, as a fraction of the patch grid's side (0.5: the released "
        "sigma of 12 on 24 x 24)",
        0.5,
    )
    adaptprune_radius: float = positive_number("adaptprune: suppression window, in grid cells (Euclidean)", 5.0)
    adaptprune_distance_sigma: float = positive_number("adaptprune: width of the spatial decay, in grid cells", 1.5)
    adaptprune_similarity_sigma: float = positive_number(
        "adaptprune: width of the key-similarity decay on 1 - cosine", 0.05
    )

    def keep_mask(self, signals: dict[str, torch.Tensor], budgets: torch.Tensor) -> torch.Tensor:
        grid = signals["grid"]
        scores = signals["prompt_attention"] * centred_prior(grid, self.adaptprune_prior_sigma)
        return soft_suppression_keep(
            scores,
            signals["keys"],
            grid,
            budgets,
            radius=self.adaptprune_radius,
            distance_sigma=self.adaptprune_distance_sigma,
            similarity_sigma=self.adaptprune_similarity_sigma,
        )
