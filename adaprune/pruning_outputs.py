"""The outputs of the pruning models: image features with their budgets and kept tokens, and the stock model
outputs plus how the prefill batch was compacted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaModelOutputWithPast,
)
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextCausalLMOutputWithPast,
    LlavaNextModelOutputWithPast,
)

from .anyres_layout import PackedLayout


@dataclass
class AdaPruneImageFeaturesOutput(BaseModelOutputWithPooling):
    """`get_image_features` output: `pooler_output` holds each image's kept projected features.

    token_budgets: (n_images,) number of tokens each image keeps (with an in-LLM selector: from its layer K on).
    kept_indices: per image, the ascending indices of the tokens the vision stage keeps among its unpruned tokens
        (for LLaVA-NeXT, positions in its packed sequence, kept newline tokens included); with an in-LLM selector
        and no vision stage, every token.
    tokens_per_image: per image, its number of unpruned tokens (= its placeholders in the prompt).
    visual_tokens_per_image: per image, the tokens its budget is drawn from (LLaVA-NeXT: without the newlines).
    unit_budgets: per image, the budgets of its budget units (LLaVA-NeXT with budget_scope="crop": one per crop
        with tokens, base crop first; else one), summing to its token budget.
    packed_layouts: LLaVA-NeXT: per image, where each position of its packed sequence comes from.
    cls_attention: when a selector reads it, per image the vision tower's [CLS] attention (mean over heads) to
        each of its unpruned tokens (LLaVA-NeXT: each crop's own [CLS], 0 at newlines).
    """

    token_budgets: torch.LongTensor | None = None
    kept_indices: list[torch.LongTensor] | None = None
    tokens_per_image: list[int] | None = None
    visual_tokens_per_image: list[int] | None = None
    unit_budgets: list[torch.LongTensor] | None = None
    packed_layouts: list[PackedLayout] | None = None
    cls_attention: list[torch.Tensor] | None = None

    def select_images(self, order: list[int]) -> AdaPruneImageFeaturesOutput:
        """The same output for the images in `order` (repeats allowed), as beam search needs."""
        return AdaPruneImageFeaturesOutput(
            pooler_output=[self.pooler_output[image] for image in order],
            token_budgets=self.token_budgets[torch.as_tensor(order, device=self.token_budgets.device)],
            kept_indices=[self.kept_indices[image] for image in order],
            tokens_per_image=[self.tokens_per_image[image] for image in order],
            visual_tokens_per_image=[self.visual_tokens_per_image[image] for image in order],
            unit_budgets=[self.unit_budgets[image] for image in order],
            packed_layouts=None if self.packed_layouts is None else [self.packed_layouts[image] for image in order],
            cls_attention=None if self.cls_attention is None else [self.cls_attention[image] for image in order],
        )


@dataclass
class PrunedSequenceFields:
    """How the prefill batch was compacted: the mask and positions the language model's last layer saw, and for
    each of its positions the position of the caller's sequence it came from (`source_index`, -1 at added
    padding). `kept_indices_by_layer` says which of each image's tokens every pruning stage kept: layer 0 (before
    the language model) and, with an in-LLM selector, each of its cut layers (indices among the image's unpruned
    tokens). `selector_report` holds what an in-LLM selector reports about its choice, per budget unit (AutoPrune:
    its schedule and mutual information)."""

    pruned_attention_mask: torch.LongTensor | None = None
    pruned_position_ids: torch.LongTensor | None = None
    source_index: torch.LongTensor | None = None
    token_budgets: torch.LongTensor | None = None
    kept_indices_by_layer: dict[int, list[torch.LongTensor]] | None = None
    selector_report: dict[str, torch.Tensor] | None = None


@dataclass
class AdaPruneModelOutputWithPast(PrunedSequenceFields, LlavaModelOutputWithPast):
    """`LlavaModelOutputWithPast` plus the compaction of the prefill batch."""


@dataclass
class AdaPruneCausalLMOutputWithPast(PrunedSequenceFields, LlavaCausalLMOutputWithPast):
    """`LlavaCausalLMOutputWithPast` plus the compaction of the prefill batch; logits are over the compacted batch."""


@dataclass
class AdaPruneLlavaNextModelOutputWithPast(PrunedSequenceFields, LlavaNextModelOutputWithPast):
    """`LlavaNextModelOutputWithPast` plus the compaction of the prefill batch."""


@dataclass
class AdaPruneLlavaNextCausalLMOutputWithPast(PrunedSequenceFields, LlavaNextCausalLMOutputWithPast):
    """`LlavaNextCausalLMOutputWithPast` plus the compaction of the prefill batch; logits over the compacted batch."""


def is_pruned(image_output: Any) -> bool:
    return getattr(image_output, "kept_indices", None) is not None
