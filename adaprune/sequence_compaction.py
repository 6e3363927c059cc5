"""Removing dropped positions from a padded batch of sequences.

A `CompactionPlan` records, for every position of the shorter left-padded batch, which position of the original
batch it came from. The same plan then compacts embeddings, masks, labels and position ids, and maps outputs back
(``source_index``). Rows may keep different numbers of tokens; the shorter ones are padded on the left, so the
last column holds every row's last real token, as `generate()` expects. Nothing here is specific to image
placeholders or to the model's input, so a later stage (e.g. a decoder layer that drops more tokens) can plan and
apply a compaction of an already compacted batch the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate

import torch

POSITION_POLICIES = ("compact", "original")


@dataclass(frozen=True)
class CompactionPlan:
    """Maps a compacted (B, L') batch to the original (B, L) one.

    source_index: original position of each compacted position, -1 at padding.
    attention_mask: 1 at real tokens, 0 at the left padding that compaction introduced.
    """

    source_index: torch.LongTensor
    attention_mask: torch.LongTensor

    @property
    def is_padding(self) -> torch.BoolTensor:
        return self.source_index < 0

    def then(self, next_plan: CompactionPlan) -> CompactionPlan:
        """This plan followed by `next_plan` (a compaction of the batch this one produces), as one plan."""
        index = self.source_index.gather(1, next_plan.source_index.clamp_min(0))
        return CompactionPlan(
            source_index=index.masked_fill(next_plan.is_padding, -1), attention_mask=next_plan.attention_mask
        )

    def gather(self, values: torch.Tensor, pad_value: float | int = 0) -> torch.Tensor:
        """Compacts a (B, L, ...) tensor along dim 1, writing `pad_value` at padding."""
        index = self.source_index.clamp_min(0)
        index = index.view(*index.shape, *([1] * (values.ndim - 2))).expand(*index.shape, *values.shape[2:])
        gathered = torch.gather(values, 1, index)
        padding = self.is_padding.view(*index.shape[:2], *([1] * (values.ndim - 2)))
        return gathered.masked_fill(padding, pad_value)


def left_compaction(keep: torch.Tensor) -> CompactionPlan:
    """Plan that keeps the True positions of `keep` (B, L) in order, right-aligned, padded on the left."""
    batch, length = keep.shape
    kept_per_row = keep.sum(-1)
    new_length = int(kept_per_row.max()) if batch else 0
    order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices[:, length - new_length :]
    kept = torch.gather(keep, 1, order)
    return CompactionPlan(source_index=order.masked_fill(~kept, -1), attention_mask=kept.long())


def placeholder_keep_flags(kept_indices: Sequence[torch.Tensor], tokens_per_image: Sequence[int]) -> torch.Tensor:
    """One flag per image placeholder, in placeholder order (images one after another): is it kept?"""
    offsets = [0, *accumulate(tokens_per_image)]
    device = kept_indices[0].device if kept_indices else None
    flags = torch.zeros(offsets[-1], dtype=torch.bool, device=device)
    if kept_indices:
        flags[torch.cat([indices + offset for indices, offset in zip(kept_indices, offsets)])] = True
    return flags


def images_per_row(placeholders_per_row: Sequence[int], tokens_per_image: Sequence[int]) -> list[range]:
    """Which images (in placeholder order) belong to each row, given each row's placeholder count."""
    groups, image = [], 0
    for row, count in enumerate(placeholders_per_row):
        start, remaining = image, count
        while remaining > 0 and image < len(tokens_per_image):
            remaining -= tokens_per_image[image]
            image += 1
        if remaining > 0:
            raise ValueError(
                f"row {row} has {count} image placeholder tokens, more than the images left for it provide "
                f"({list(tokens_per_image[start:])} tokens); every placeholder run needs its image"
            )
        if remaining < 0:
            raise ValueError(
                f"row {row} has {count} image placeholder tokens, which is not a whole number of images of "
                f"{list(tokens_per_image[start:image])} tokens; build the inputs with the model's processor"
            )
        groups.append(range(start, image))
    if image != len(tokens_per_image):
        raise ValueError(
            f"the prompts have placeholders for {image} images but {len(tokens_per_image)} images were given; "
            "every image needs its placeholders in the text"
        )
    return groups


def default_position_ids(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Positions counted over real tokens only (the `generate()` convention), 0 at padding."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def compacted_position_ids(
    plan: CompactionPlan,
    keep: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None,
    policy: str,
) -> torch.LongTensor:
    """Position ids of the compacted batch.

    "original": every kept token keeps its position. "compact": positions close up over dropped tokens, as if the
    image had only its kept tokens (a kept token moves back by the number of dropped tokens before it).
    """
    if policy not in POSITION_POLICIES:
        raise ValueError(f"position_policy must be one of {POSITION_POLICIES}, got {policy!r}")
    if position_ids is None:
        position_ids = default_position_ids(attention_mask)
    position_ids = position_ids.expand_as(attention_mask)
    if policy == "compact":
        dropped = attention_mask.bool() & ~keep
        position_ids = position_ids - dropped.long().cumsum(-1)
    return plan.gather(position_ids, pad_value=0)


@dataclass(frozen=True)
class Compaction:
    """One compaction of a prefill: from decoder layer `first_layer` on, the layers see `plan` applied to the
    sequence the previous compaction left (the first one applies to the caller's sequence)."""

    first_layer: int
    plan: CompactionPlan


@dataclass(frozen=True)
class PruningState:
    """How a KV cache filled by a pruned prefill lines up with the caller's sequence.

    Callers keep addressing their full sequence: after the prefill, attention masks and position ids cover every
    position of it, dropped tokens included, as for the stock model. The cache of layer l holds the prefill as
    compacted by every compaction up to l (`plan_at(l)`), then one entry per later token, so a later step's inputs
    are mapped onto it by `step_inputs`. Compactions come in layer order; the first (layer 0) is the one before the
    language model, deeper ones prune inside it.

    position_shift: (B,) how far each row's positions after the prefill move back ("compact" policy: the number
        of real tokens dropped before the language model; "original": 0).
    """

    caller_length: int
    position_shift: torch.LongTensor
    compactions: tuple[Compaction, ...]

    def then(self, compaction: Compaction) -> PruningState:
        """This state with a deeper compaction added."""
        if self.compactions and compaction.first_layer <= self.compactions[-1].first_layer:
            raise ValueError(
                f"compactions go deeper: layer {compaction.first_layer} follows layer "
                f"{self.compactions[-1].first_layer}"
            )
        return replace(self, compactions=(*self.compactions, compaction))

    def plan_at(self, layer: int) -> CompactionPlan:
        """The caller's sequence as layer `layer` sees it: every compaction up to that layer, composed."""
        plans = [compaction.plan for compaction in self.compactions if compaction.first_layer <= layer]
        if not plans:
            raise ValueError(
                f"no compaction applies at layer {layer}; the first is at {self.compactions[0].first_layer}"
            )
        composed = plans[0]
        for plan in plans[1:]:
            composed = composed.then(plan)
        return composed

    def covered_length(self, cache_length: int, layer: int = 0) -> int:
        """How many positions of the caller's sequence the cache of `layer`, `cache_length` entries long, holds."""
        compact_length = self.plan_at(layer).source_index.shape[1]
        if cache_length < compact_length:
            raise ValueError(
                f"the cache holds {cache_length} tokens, fewer than its pruned prefill of {compact_length}; a "
                "cache cut into its pruned prefill cannot be continued, run the prompt again"
            )
        return self.caller_length + cache_length - compact_length

    def step_inputs(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        new_shape: tuple[int, int],
        cache_length: int,
        layer: int = 0,
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """The attention mask (over the cache of `layer` plus the new tokens) and the position ids of the new
        tokens (`new_shape`: rows, tokens) that follow the cached ones, from the caller's mask over its full sequence (None: all ones) and
        position ids (None: continuing after the covered positions, as the stock model counts them)."""
        plan = self.plan_at(layer)
        batch = plan.source_index.shape[0]
        rows, new_tokens = new_shape
        if rows != batch:
            raise ValueError(
                f"the cache filled by the pruned prefill holds {batch} sequences, and the inputs have {rows}; "
                "continue each cached sequence once (no num_beams or num_return_sequences above 1 when continuing "
                "a cache)"
            )
        covered = self.covered_length(cache_length, layer)
        device = plan.source_index.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, covered + new_tokens, dtype=torch.long, device=device)
        if tuple(attention_mask.shape) != (batch, covered + new_tokens):
            raise ValueError(
                f"after a pruned prefill the attention_mask covers the caller's full sequence: expected shape "
                f"{(batch, covered + new_tokens)} ({covered} cached positions, dropped image tokens included, plus "
                f"{new_tokens} new), got {tuple(attention_mask.shape)}; pass the mask of the whole sequence"
            )
        attention_mask = attention_mask.long()
        cached_prefill = plan.gather(attention_mask[:, : self.caller_length])
        compact_mask = torch.cat([cached_prefill, attention_mask[:, self.caller_length :]], dim=1)
        if position_ids is None:
            position_ids = torch.arange(covered, covered + new_tokens, device=device).expand(batch, -1)
        return compact_mask, position_ids - self.position_shift.to(position_ids.device).unsqueeze(-1)


def prefill_state(plan: CompactionPlan, keep: torch.Tensor, attention_mask: torch.Tensor, policy: str) -> PruningState:
    """The state of a prefill compacted by `plan` before the language model (kept positions `keep` of the
    caller's (B, L) batch)."""
    dropped = (attention_mask.bool() & ~keep).sum(-1)
    shift = dropped if policy == "compact" else torch.zeros_like(dropped)
    return PruningState(caller_length=keep.shape[1], position_shift=shift, compactions=(Compaction(0, plan),))
