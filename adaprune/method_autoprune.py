"""AutoPrune: a per-sample retention schedule over decoder depth, shaped by text-vision mutual information."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .settings import LanguageModelSelector, positive_number, setting
from .token_selection import top_k_mask

REFERENCE_DEPTH = 32
"""The released curve's constants (x0 = 14.9, slopes in [0, 0.4]) are for LLaVA-1.5-7B's 32 decoder layers; other
depths see the same curve stretched to their own."""

AMPLITUDE = 0.75
"""The released curve's height; the budget's scale absorbs it, except where a layer's fraction reaches 1."""

SCALE_RANGE = 20.0
BISECTION_STEPS = 64


def mutual_information(attention: torch.Tensor, rows: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per unit and head, the mutual information (bits) between text rows and visual columns of an attention
    block, as AutoPrune releases it: the block B (text rows x the unit's visual columns, not renormalised) is read
    as p(y|x) under a uniform p(x) = 1/Q, so MI = sum (B/Q) log2 max(B / (mean_x B + Q eps), eps).

    attention: (n, N, heads, Q) probabilities, 0 at absent tokens and past a unit's `rows` (n,) text rows.
    Returns (n, heads), float32.
    """
    block = attention.float()
    n_rows = rows.clamp_min(1).float().view(-1, 1, 1, 1)
    column_mean = block.sum(-1, keepdim=True) / n_rows
    ratio = (block / (column_mean + n_rows * eps)).clamp_min(eps)
    return (block / n_rows * torch.log2(ratio)).sum(dim=(1, 3))


def text_relevance(attention: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(n, N): each visual token's attention from the text rows, averaged over the unit's text rows and heads."""
    return attention.float().sum(-1).mean(-1) / rows.clamp_min(1).float().unsqueeze(-1)


def retention_curve(slope: torch.Tensor, n_layers: int, midpoint: float) -> torch.Tensor:
    """(n, n_layers) the logistic fraction A / (1 + exp(k (j - (x0 + k)))) at each layer j (in reference layers)
    for each unit's slope k; a flat curve for k = 0, a late cut for large k."""
    depth = torch.arange(n_layers, dtype=torch.float64, device=slope.device) * REFERENCE_DEPTH / n_layers
    k = slope.double().unsqueeze(-1)
    return AMPLITUDE / (1 + torch.exp(k * (depth - (midpoint + k))))


def schedule_counts(scale: torch.Tensor, curve: torch.Tensor, first_keep: torch.Tensor) -> torch.Tensor:
    """(n, L) visual tokens left after each layer: `first_keep` after layer 0, then ceil((first_keep - 1) min(1,
    scale p_j)) after layer j, never more than before."""
    base = (first_keep - 1).clamp_min(0).double().unsqueeze(-1)
    later = torch.ceil(base * (scale.unsqueeze(-1) * curve[:, 1:]).clamp_max(1)).long()
    return torch.cat([first_keep.unsqueeze(-1), later], dim=-1).cummin(dim=-1).values


def retention_schedule(
    slope: torch.Tensor, first_keep: torch.LongTensor, targets: torch.LongTensor, n_layers: int, midpoint: float
) -> torch.LongTensor:
    """(n, n_layers) each unit's visual tokens after each layer: its curve scaled so that the counts sum to
    `targets * n_layers` (a mean of `targets` per layer) as closely as integers allow.

    The scale is found by bisection, batched over units, on the released range [0, 20], widened for a unit only
    when even 20 falls short (a large target on a steep curve; the released code then misses its budget); of the
    scales tried, the first closest to the target is kept (the released search, which stops at an exact match,
    ends on the same counts). Raises ValueError, naming the values, when a target is out of reach: the mean would
    miss it by a token or more. One host sync, for that check.
    """
    curve = retention_curve(slope, n_layers, midpoint)
    wanted = targets.long() * n_layers
    low = torch.zeros(len(slope), dtype=torch.float64, device=slope.device)
    released_high = torch.full_like(low, SCALE_RANGE)
    short = schedule_counts(released_high, curve, first_keep).sum(-1) < wanted
    high = torch.where(short, torch.maximum(released_high, 1 / curve[:, 1:].amin(-1)), released_high)
    best_scale, best_gap = low.clone(), torch.full_like(wanted, torch.iinfo(torch.long).max)
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        total = schedule_counts(middle, curve, first_keep).sum(-1)
        gap = (total - wanted).abs()
        better = gap < best_gap
        best_scale, best_gap = torch.where(better, middle, best_scale), torch.where(better, gap, best_gap)
        below = total < wanted
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    missed = (best_gap >= n_layers).nonzero().flatten().tolist()
    if missed:
        unit = missed[0]
        most = (int(first_keep[unit]) + (n_layers - 1) * max(int(first_keep[unit]) - 1, 0)) / n_layers
        raise ValueError(
            f"autoprune cannot average {int(targets[unit])} visual tokens per layer over {n_layers} layers in budget "
            f"unit {unit}, which keeps {int(first_keep[unit])} after layer 0 (at most {most:.2f} per layer); lower "
            "its budget (fixed_tokens, max_tokens) or raise autoprune_first_keep_ratio"
        )
    return schedule_counts(best_scale, curve, first_keep)


@dataclass(frozen=True)
class AutoPruneSelector(LanguageModelSelector):
    """AutoPrune (Wang et al., "Each Complexity Deserves a Pruning Policy", NeurIPS 2025, arXiv 2509.23931; code
    github.com/AutoLab-SAI-SJTU/AutoPrune): prunes after every decoder layer on a per-sample schedule.

    After layer 0 each unit keeps its first_keep_ratio x budget tokens with the highest [CLS] prior plus 0.3 x MI0
    x text relevance (MI0: layer 0's text-vision mutual information over heads, divided by the text rows;
    relevance: the text rows' attention, mean over heads and rows). Layer 1's mutual information MI1 (sum over
    heads, on the surviving tokens) sets the slope k = max(k0 - gamma MI1, 0) of a logistic retention curve over
    depth (high MI: prune early and hold; low MI: keep many tokens, then cut late), scaled by bisection so that the
    tokens left after each layer average the unit's budget over the layers (the released `target_token_num`
    accounting: layer 0's input is not counted, the last layer's output is). After each later layer the unit
    keeps its scheduled count by text relevance.

    Differences from the released code, on purpose: kept tokens keep their positions (the released code renumbers
    them contiguously at every layer); dropped tokens are not "recycled" into cluster averages appended to the
    sequence (merged tokens have no position and no counterpart in the stock model, so no oracle could check
    them; the schedule counts only real tokens); the curve's constants, set for 32 layers, are stretched to the
    model's depth; the text rows are those after the row's last image (any template, several images); each
    budget unit (a LLaVA-NeXT image or crop, as `budget_scope` says) has its own mutual information and schedule;
    the mutual information is computed in float32.
    """

    name: ClassVar[str] = "autoprune"
    required_signals: ClassVar[frozenset[str]] = frozenset({"text_attention", "cls_attention"})

    autoprune_first_keep_ratio: float = positive_number(
        "autoprune: tokens kept after layer 0, as a multiple of the budget (at most the unit's tokens)", 2.5
    )
    autoprune_text_weight: float = setting(0.3, "autoprune: weight of MI0 x text relevance against the [CLS] prior")
    autoprune_midpoint: float = setting(
        14.9,
        "autoprune: x0, the retention curve's midpoint in layers of a 32-layer model (plus the slope, as released)",
    )
    autoprune_base_slope: float = setting(0.4, "autoprune: k0, the curve's slope at zero mutual information")
    autoprune_mi_gain: float = setting(0.2, "autoprune: gamma, how much each bit of mutual information flattens it")

    def cut_layers(self, n_layers: int) -> tuple[int, ...]:
        if n_layers < 3:
            raise ValueError(
                f"selector 'autoprune' measures its schedule at decoder layer 1 and prunes after every layer, so it "
                f"needs a language model of at least 3 layers, got {n_layers}; use 'fastv' or 'adaptprune'"
            )
        return tuple(range(1, n_layers))

    def keep_at(
        self, layer: int, signals: dict[str, Any], budgets: torch.Tensor, record: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        attention, rows, present = signals["text_attention"], signals["text_rows"], signals["present"]
        relevance = text_relevance(attention, rows)
        if layer == 1:
            first_information = mutual_information(attention, rows).sum(-1) / rows.clamp_min(1)
            first_keep = torch.minimum((budgets * self.autoprune_first_keep_ratio).floor().long(), present.sum(-1))
            record["first_keep"] = first_keep
            score = signals["cls_attention"] + self.autoprune_text_weight * first_information.unsqueeze(-1) * relevance
            return top_k_mask(score.masked_fill(~present, float("-inf")), first_keep)
        if layer == 2:
            information = mutual_information(attention, rows).sum(-1)
            slope = (self.autoprune_base_slope - self.autoprune_mi_gain * information).clamp_min(0)
            n_layers = signals["n_layers"]
            record["mutual_information"], record["slope"] = information, slope
            record["tokens_per_layer"] = retention_schedule(
                slope, record.pop("first_keep"), budgets, n_layers, self.autoprune_midpoint
            )
        return top_k_mask(relevance.masked_fill(~present, float("-inf")), record["tokens_per_layer"][:, layer - 1])
