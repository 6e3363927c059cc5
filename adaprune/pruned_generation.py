"""What every pruning `*ForConditionalGeneration` shares: logits and labels over the compacted prefill, and
`generate()` on a shortened prefill."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput
from transformers.utils.generic import can_return_tuple

from .compat import (
    cache_argument,
    model_output_fields,
    pop_cache,
    slice_logits_to_keep,
)
from .pruned_prefill import PrunedPrefillMixin, pruning_state_of
from .pruning_outputs import PrunedSequenceFields, is_pruned
from .sequence_compaction import (
    CompactionPlan,
    PruningState,
    images_per_row,
)

IGNORE_INDEX = -100


def _brief(value: Any) -> str:
    """A value for an error message: a module by its class name, not its whole repr."""
    return f"<{type(value).__name__}>" if isinstance(value, nn.Module) else repr(value)


class PrunedGenerationMixin:
    """What every pruning `*ForConditionalGeneration` shares: logits and labels over the compacted prefill, and
    `generate()` on a shortened prefill (refused options, beam expansion of pruned images, continuing from a cache
    that a pruned prefill filled). Placed before the stock class in the bases."""

    config: Any
    model: PrunedPrefillMixin
    lm_head: nn.Linear
    causal_lm_output_class: type[ModelOutput]

    @can_return_tuple
    def forward(
        self,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **inputs: Any,
    ) -> tuple | ModelOutput:
        """Stock forward (it carries the stock signature, see `with_signature_of`); with images, logits (and
        `labels`) are over the compacted batch, see `source_index`."""
        cache = pop_cache(inputs)
        outputs = self.model(**inputs, **cache_argument(cache))
        plan = None
        if getattr(outputs, "source_index", None) is not None:
            plan = CompactionPlan(source_index=outputs.source_index, attention_mask=outputs.pruned_attention_mask)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            if plan is not None:
                labels = plan.gather(labels, pad_value=IGNORE_INDEX)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **inputs
            )
        return self.causal_lm_output_class(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **model_output_fields(outputs),
            **{field.name: getattr(outputs, field.name, None) for field in fields(PrunedSequenceFields)},
        )

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`GenerationMixin.generate`, refusing the options that cannot work with a shortened prefill, and
        continuing from a cache that a pruned prefill filled (see `_generate_from_pruned_cache`)."""
        has_images = kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs") is not None
        if has_images and self.config.pruning.enabled:
            generation_config = kwargs.get("generation_config") or self.generation_config
            for option in ("prefill_chunk_size", "assistant_model", "prompt_lookup_num_tokens"):
                value = kwargs.get(option, getattr(generation_config, option, None))
                if value is not None:
                    raise ValueError(
                        f"{option}={_brief(value)} cannot be combined with visual-token pruning, which shortens the "
                        f"prefill sequence; leave {option} unset, or disable pruning (config.enabled=False)"
                    )
        cache = pop_cache(kwargs)
        state = pruning_state_of(cache)
        with self.model.holding_language_selections():
            if state is None:
                return super().generate(*args, **cache_argument(cache), **kwargs)  # type: ignore[misc]
            return self._generate_from_pruned_cache(cache, state, *args, **kwargs)

    def _generate_from_pruned_cache(self, cache: Any, state: PruningState, *args: Any, **kwargs: Any) -> Any:
        """Continues a conversation from a cache that a pruned prefill filled, as with the stock model: the caller
        passes its full sequence (previous prompt, the tokens generated since, new tokens) and its mask. The cache
        is shorter than that sequence, so stock `generate()` would re-feed cached tokens; only the positions the
        cache does not hold are fed, with the full mask, and the caller's prefix is put back in front."""
        input_ids = args[0] if args else kwargs.pop("input_ids", kwargs.pop("inputs", None))
        for option in ("inputs_embeds", "pixel_values", "mm_encoder_outputs"):
            if kwargs.get(option) is not None:
                raise ValueError(
                    f"{option} cannot continue a cache filled by a pruned prefill: continue with input_ids only "
                    "(new images need a new prompt from an empty cache)"
                )
        covered = state.covered_length(cache.get_seq_length())
        if input_ids is None or input_ids.shape[1] <= covered:
            length = None if input_ids is None else input_ids.shape[1]
            raise ValueError(
                f"the cache already holds {covered} positions of the sequence (its pruned prefill included), and "
                f"input_ids has {length}; pass the full sequence: the previous prompt, the tokens generated since and "
                "at least one new token"
            )
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generation_config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("max_new_tokens", generation_config.max_new_tokens) is None:
            # max_length counts the whole sequence, of which only the uncached part is fed
            kwargs["max_length"] = kwargs.get("max_length", generation_config.max_length) - covered
        output = super().generate(  # type: ignore[misc]
            input_ids[:, covered:], *args[1:], attention_mask=attention_mask, **cache_argument(cache), **kwargs
        )
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        sequences = torch.cat([input_ids[:, :covered].to(sequences.device), sequences], dim=1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output

    def _expand_multimodal_outputs(
        self,
        input_ids: torch.LongTensor,
        mm_encoder_output: dict,
        expand_size: int = 1,
        inputs_embeds: torch.Tensor | None = None,
    ) -> dict:
        image_output = mm_encoder_output.get("image")
        if not is_pruned(image_output):
            return super()._expand_multimodal_outputs(  # type: ignore[misc]
                input_ids, mm_encoder_output, expand_size, inputs_embeds
            )
        placeholders_per_row = self.model.image_placeholder_mask(input_ids, inputs_embeds).sum(-1).tolist()
        groups = images_per_row(placeholders_per_row, image_output.tokens_per_image)
        order = [image for group in groups for _ in range(expand_size) for image in group]
        return {**mm_encoder_output, "image": image_output.select_images(order)}
