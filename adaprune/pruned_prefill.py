"""The prefill on the shortened sequence, shared by every pruning `*Model`: image features cut to their budgets,
dropped placeholders removed from the batch, with an in-LLM selector the cuts at its decoder layers
(`decoder_pruning`), and the cache's pruning state for the steps that follow."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.utils.generic import can_return_tuple

from .compat import (
    CACHE_FIELD,
    cache_argument,
    image_output_fields,
    output_cache,
    pop_cache,
)
from .configuration_adaprune import PruningSettings
from .decoder_pruning import (
    ImageTokens,
    LayerCuts,
    SelectionUnits,
    check_cut_layers,
    continuing_pruned_cache,
    pruning_inside,
)
from .pruning_outputs import AdaPruneImageFeaturesOutput, is_pruned
from .sequence_compaction import (
    Compaction,
    CompactionPlan,
    PruningState,
    compacted_position_ids,
    left_compaction,
    placeholder_keep_flags,
    prefill_state,
)
from .token_selection import kept_indices_from_mask
from .vision_probes import TowerFeatures, capturing_cls_attention, cls_attention_module


class PrunedPrefillMixin:
    """What every pruning `*Model` shares: image features cut to per-image budgets, and a prefill `forward` on the
    shortened sequence. Placed before the stock model class in the bases; a variant implements `_prune` (from
    the stock features to the kept ones) and `image_energy_curves`."""

    config: Any
    model_output_class: type[ModelOutput]

    def __init__(self, config: Any) -> None:
        self._check_pruning(config.pruning, config.text_config)  # from_pretrained's settings bypass the config check
        super().__init__(config)

    def _check_pruning(self, settings: PruningSettings, text_config: Any) -> None:
        """Raises ValueError for settings this model cannot run (e.g. an in-LLM layer it does not have)."""
        if settings.token_selector.stage == "language":
            check_cut_layers(text_config, settings.token_selector)

    def _feature_choice(
        self, vision_feature_layer: int | list[int] | None, vision_feature_select_strategy: str | None
    ) -> tuple[int | list[int], str]:
        """The feature layer(s) and select strategy in effect: the arguments, else the config's."""
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = (
            self.config.vision_feature_select_strategy
            if vision_feature_select_strategy is None
            else vision_feature_select_strategy
        )
        return layer, strategy

    def _stock_image_features(self, **stock_kwargs: Any) -> BaseModelOutputWithPooling:
        return super().get_image_features(**stock_kwargs, return_dict=True)  # type: ignore[misc]

    def _pruned_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None,
        vision_feature_layer: int | list[int] | None,
        vision_feature_select_strategy: str | None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Stock image features, then `_prune`; the stock output unchanged when pruning is disabled."""
        settings = self.config.pruning
        layer, strategy = self._feature_choice(vision_feature_layer, vision_feature_select_strategy)
        stock_kwargs = dict(
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            vision_feature_layer=layer,
            vision_feature_select_strategy=strategy,
            **kwargs,
        )
        if not settings.enabled:
            return self._stock_image_features(**stock_kwargs)
        self._check_pruning(settings, self.config.text_config)
        signals: dict[str, torch.Tensor] = {}
        readers = (settings.vision_selector, settings.token_selector)
        if any(selector is not None and "cls_attention" in selector.required_signals for selector in readers):
            with capturing_cls_attention(cls_attention_module(self.vision_tower, layer)) as signals:
                output = self._stock_image_features(**stock_kwargs)
            if strategy == "default":
                signals["cls_attention"] = signals["cls_attention"][:, 1:]
        else:
            output = self._stock_image_features(**stock_kwargs)
        return self._prune(TowerFeatures(output, layer, strategy, image_sizes), signals, settings)

    def _prune(
        self, features: TowerFeatures, signals: dict[str, torch.Tensor], settings: PruningSettings
    ) -> AdaPruneImageFeaturesOutput:
        """From the stock features to each image's kept ones (a variant's own packing of image tokens)."""
        raise NotImplementedError

    @torch.no_grad()
    def image_energy_curves(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
    ) -> list[list[torch.Tensor]]:
        """Per image, the energy curve E(k) of each of its budget units (LLaVA: one per image; LLaVA-NeXT: one per
        image, or per crop with `budget_scope="crop"`, base crop first), as the budgets use them. Calibration
        computes these once and then tries many energy ratios on them."""
        layer, strategy = self._feature_choice(vision_feature_layer, vision_feature_select_strategy)
        output = self._stock_image_features(
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            vision_feature_layer=layer,
            vision_feature_select_strategy=strategy,
        )
        return self._energy_curves(TowerFeatures(output, layer, strategy, image_sizes), self.config.pruning)

    def _energy_curves(self, features: TowerFeatures, settings: PruningSettings) -> list[list[torch.Tensor]]:
        """Per image, the energy curve of each of its budget units."""
        raise NotImplementedError

    def image_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.BoolTensor:
        """(B, L) mask of the image placeholder tokens, from the ids or, when there are none (`generate()` passes
        an empty (B, 0) tensor with `inputs_embeds`), from the embeddings."""
        if input_ids is not None and (input_ids.shape[-1] > 0 or inputs_embeds is None):
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Any,
    ) -> tuple | ModelOutput:
        """Stock forward (it carries the stock signature, see `with_signature_of`); with pruned images the language
        model runs on the compacted batch (see the output's `source_index`, `pruned_attention_mask` and
        `pruned_position_ids`). Attention masks and position ids always address the caller's full sequence, also
        in later steps on a cache filled by a pruned prefill."""
        cache = pop_cache(kwargs)
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        if mm_encoder_outputs.get("image") is None and pixel_values is not None and len(pixel_values) > 0:
            mm_encoder_outputs["image"] = self.get_image_features(
                pixel_values=pixel_values,
                image_sizes=image_sizes,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                return_dict=True,
            )
        image_output = mm_encoder_outputs.get("image")
        state = pruning_state_of(cache)
        if not is_pruned(image_output):
            continuation = nullcontext()
            if state is not None:
                new_shape = tuple((input_ids if input_ids is not None else inputs_embeds).shape[:2])
                continuation = continuing_pruned_cache(self.language_model, state, cache, attention_mask, new_shape)
                attention_mask, position_ids = state.step_inputs(
                    attention_mask, position_ids, new_shape, cache.get_seq_length()
                )
            with continuation:
                return super().forward(  # type: ignore[misc]
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    inputs_embeds=inputs_embeds,
                    mm_encoder_outputs=mm_encoder_outputs or None,
                    **cache_argument(cache),
                    **kwargs,
                )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        _check_prefill_cache(cache)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        elif attention_mask.ndim != 2:
            raise ValueError(
                f"pruning needs a 2-D (batch, sequence) attention_mask, got shape {tuple(attention_mask.shape)}; "
                "pass the processor's attention_mask"
            )

        placeholders = self.image_placeholder_mask(input_ids, inputs_embeds)
        _check_placeholders(placeholders, attention_mask, image_output.tokens_per_image)
        kept_placeholders = torch.zeros_like(placeholders)
        kept_placeholders[placeholders] = placeholder_keep_flags(
            image_output.kept_indices, image_output.tokens_per_image
        )
        image_features = torch.cat(list(image_output.pooler_output)).to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(kept_placeholders.unsqueeze(-1), image_features)

        keep = attention_mask.bool() & (~placeholders | kept_placeholders)
        plan = left_compaction(keep)
        settings = self.config.pruning
        positions = compacted_position_ids(plan, keep, attention_mask, position_ids, settings.position_policy)
        state = prefill_state(plan, keep, attention_mask, settings.position_policy)
        kept_by_layer = {0: image_output.kept_indices}
        with self._language_stage(settings, image_output, placeholders, plan, cache) as cuts:
            outputs = self.language_model(
                inputs_embeds=plan.gather(inputs_embeds),
                attention_mask=plan.attention_mask,
                position_ids=positions,
                **cache_argument(cache),
                **kwargs,
            )
        report = None
        if cuts is not None and cuts.keeps:
            if self._held_selections is not None:
                self._held_selections.setdefault(id(image_output), cuts.keeps)
            counts = torch.stack([keep.sum(-1) for keep in cuts.keeps.values()]).tolist()
            for (layer, keep), layer_counts in zip(cuts.keeps.items(), counts):
                state = state.then(Compaction(layer, cuts.plans[layer]))
                positions = cuts.plans[layer].gather(positions)
                plan = plan.then(cuts.plans[layer])
                kept_by_layer[layer] = kept_indices_from_mask(keep, layer_counts)[1]
            report = cuts.record or None
        new_cache = output_cache(outputs)
        if new_cache is not None:
            setattr(new_cache, PRUNING_STATE_ATTRIBUTE, state)
        return self.model_output_class(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: new_cache},
            **image_output_fields(image_output, image_features),
            pruned_attention_mask=plan.attention_mask,
            pruned_position_ids=positions,
            source_index=plan.source_index,
            token_budgets=image_output.token_budgets,
            kept_indices_by_layer=kept_by_layer,
            selector_report=report,
        )

    def _language_stage(
        self,
        settings: PruningSettings,
        image_output: AdaPruneImageFeaturesOutput,
        placeholders: torch.Tensor,
        plan: CompactionPlan,
        cache: Any,
    ) -> AbstractContextManager[LayerCuts | None]:
        """With an in-LLM selector, the hooks that prune inside the language model during this prefill (the
        batch as `plan` compacted it); else nothing."""
        selector = settings.token_selector
        if selector.stage != "language":
            return nullcontext()
        tokens = ImageTokens.from_placeholders(placeholders, image_output.tokens_per_image).compacted(plan)
        held = None if self._held_selections is None else self._held_selections.get(id(image_output))
        image_signals = {}
        if image_output.cls_attention is not None:
            image_signals["cls_attention"] = pad_sequence(image_output.cls_attention, batch_first=True)
        return pruning_inside(
            self.language_model,
            selector,
            self._selection_units(image_output, settings),
            tokens,
            plan.attention_mask,
            cache,
            image_signals=image_signals,
            held_keeps=held,
        )

    def _selection_units(self, image_output: AdaPruneImageFeaturesOutput, settings: PruningSettings) -> SelectionUnits:
        """The budget units an in-LLM selector chooses in, with their budgets and patch grids (a variant's own
        packing of image tokens)."""
        raise NotImplementedError

    _held_selections: dict[int, dict[int, torch.Tensor]] | None = None

    @contextmanager
    def holding_language_selections(self) -> Iterator[None]:
        """Within the block (one `generate()` call), the first prefill on an image batch fixes the in-LLM
        selection for it: steps that run the whole sequence again (`use_cache=False`) drop the same tokens as the
        prefill did, as with a cache, instead of choosing anew for a longer prompt."""
        self._held_selections = {}
        try:
            yield
        finally:
            self._held_selections = None


PRUNING_STATE_ATTRIBUTE = "adaprune_pruning_state"
"""The attribute under which a KV cache filled by a pruned prefill carries its `PruningState` (it travels
with the cache object: through `generate()`, copies and later calls)."""


def pruning_state_of(cache: Any) -> PruningState | None:
    """The pruning state of the prefill that filled `cache`, or None for an empty, unpruned (or no) cache."""
    if cache is None or cache.get_seq_length() == 0:
        return None
    return getattr(cache, PRUNING_STATE_ATTRIBUTE, None)


def _check_prefill_cache(cache: Any) -> None:
    if cache is None:
        return
    if getattr(cache, "is_compileable", False):
        raise ValueError(
            f"visual-token pruning cannot run with a {type(cache).__name__}: pruning changes the prefill length per "
            "batch, and static caches need fixed shapes; use the default dynamic cache (drop "
            "cache_implementation='static')"
        )
    if cache.get_seq_length() > 0:
        raise ValueError(
            f"visual-token pruning happens at prefill, but the cache already holds {cache.get_seq_length()} tokens; "
            "images need a prompt that starts from an empty cache (no chunked prefill, no new images in a cached "
            "conversation; continuing one with text works)"
        )


def _check_placeholders(
    placeholders: torch.BoolTensor, attention_mask: torch.Tensor, tokens_per_image: list[int]
) -> None:
    """The prompt has every image's placeholders, and the mask hides none of them: pruning picks each image's
    tokens without the mask, so a masked placeholder could silently take a kept slot (below min_tokens, or an
    empty row). One host sync for both checks."""
    hidden = placeholders & ~attention_mask.bool()
    n_placeholders, n_hidden = torch.stack([placeholders.sum(), hidden.sum()]).tolist()
    if n_placeholders != sum(tokens_per_image):
        raise ValueError(
            f"the prompt has {n_placeholders} image placeholder tokens, but its {len(tokens_per_image)} images need "
            f"{sum(tokens_per_image)} ({tokens_per_image} per image); build the inputs with the model's processor so "
            "every image has its placeholders"
        )
    if n_hidden:
        rows = sorted(set(hidden.nonzero()[:, 0].tolist()))
        raise ValueError(
            f"attention_mask hides {n_hidden} image placeholder tokens (rows {rows}); pruning chooses among all of an "
            "image's tokens, so unmask them (the processor's mask does) or disable pruning"
        )
