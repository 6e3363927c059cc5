"""LLaVA with E-AdaPrune visual-token pruning, as drop-in transformers models.

`get_image_features` computes each image's budget and kept tokens and returns only the kept projected features.
The prefill `forward` then removes the dropped image placeholders from the sequence (embeddings, attention mask,
position ids, labels), re-pads rows on the left and runs the language model on the shorter batch. The cache it
fills carries that layout (`PrunedPrefill`), so later steps, in `generate()` or a caller's own loop, keep passing
the mask and positions of the caller's full sequence and are mapped onto the shorter cache; the returned sequences
keep the caller's full prompt. Differences between transformers releases live in `compat`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    GenerationMixin,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaModelOutputWithPast,
    LlavaPreTrainedModel,
)
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextCausalLMOutputWithPast,
    LlavaNextModelOutputWithPast,
    LlavaNextPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple

from .anyres_layout import PackedLayout, budget_units, config_packed_layout, with_row_newlines
from .compat import (
    CACHE_FIELD,
    cache_argument,
    image_output_fields,
    model_output_fields,
    output_cache,
    pop_cache,
    slice_logits_to_keep,
    with_signature_of,
)
from .configuration_adaprune import AdaPruneConfig, AdaPruneLlavaNextConfig, AnyResPruningSettings, PruningSettings
from .image_pruning import UnitGroup, prune_groups, prune_images
from .sequence_compaction import (
    CompactionPlan,
    PrunedPrefill,
    compacted_position_ids,
    images_per_row,
    left_compaction,
    placeholder_keep_flags,
    pruned_prefill,
)
from .token_selection import kept_indices_from_mask

IGNORE_INDEX = -100


@dataclass
class AdaPruneImageFeaturesOutput(BaseModelOutputWithPooling):
    """`get_image_features` output: `pooler_output` holds each image's kept projected features.

    token_budgets: (n_images,) number of tokens each image keeps.
    kept_indices: per image, the ascending indices of its kept tokens among its unpruned tokens (for LLaVA-NeXT,
        positions in its packed sequence, kept newline tokens included).
    tokens_per_image: per image, its number of unpruned tokens (= its placeholders in the prompt).
    visual_tokens_per_image: per image, the tokens its budget is drawn from (LLaVA-NeXT: without the newlines).
    """

    token_budgets: torch.LongTensor | None = None
    kept_indices: list[torch.LongTensor] | None = None
    tokens_per_image: list[int] | None = None
    visual_tokens_per_image: list[int] | None = None

    def select_images(self, order: list[int]) -> AdaPruneImageFeaturesOutput:
        """The same output for the images in `order` (repeats allowed), as beam search needs."""
        return AdaPruneImageFeaturesOutput(
            pooler_output=[self.pooler_output[image] for image in order],
            token_budgets=self.token_budgets[torch.as_tensor(order, device=self.token_budgets.device)],
            kept_indices=[self.kept_indices[image] for image in order],
            tokens_per_image=[self.tokens_per_image[image] for image in order],
            visual_tokens_per_image=[self.visual_tokens_per_image[image] for image in order],
        )


@dataclass
class PrunedSequenceFields:
    """How the prefill batch was compacted: the mask and positions the language model saw, and for each of its
    positions the position of the caller's sequence it came from (`source_index`, -1 at added padding)."""

    pruned_attention_mask: torch.LongTensor | None = None
    pruned_position_ids: torch.LongTensor | None = None
    source_index: torch.LongTensor | None = None
    token_budgets: torch.LongTensor | None = None


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


def _is_pruned(image_output: Any) -> bool:
    return getattr(image_output, "kept_indices", None) is not None


def _projector_input(hidden_states: tuple[torch.Tensor, ...], layer: int | list[int], strategy: str) -> torch.Tensor:
    """The vision features LLaVA feeds its projector, rebuilt from the tower's selected hidden states."""
    layers = [layer] if isinstance(layer, int) else layer
    selected = [hidden_states[index] for index in layers]
    if strategy == "default":
        selected = [states[:, 1:] for states in selected]
    return torch.cat(selected, dim=-1)


def _encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    for owner in (getattr(vision_tower, "vision_model", None), vision_tower):
        layers = getattr(getattr(owner, "encoder", None), "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"selector 'cls_attention' cannot find the encoder layers of vision tower {type(vision_tower).__name__}; "
        "use selector='uniform' with this model"
    )


def _cls_attention_module(vision_tower: nn.Module, layer: int | list[int]) -> nn.Module:
    """The attention module whose output is hidden state `layer` (the deepest one if several are listed)."""
    tower_name = type(vision_tower).__name__
    embeddings = getattr(getattr(vision_tower, "vision_model", vision_tower), "embeddings", None)
    if getattr(embeddings, "class_embedding", None) is None:
        raise ValueError(
            f"selector 'cls_attention' needs a vision tower with a [CLS] token, and {tower_name} has none; "
            "use selector='uniform' with this model"
        )
    layers = _encoder_layers(vision_tower)
    indices = [layer] if isinstance(layer, int) else layer
    hidden_index = max(index % (len(layers) + 1) for index in indices)
    if hidden_index == 0:
        raise ValueError(
            f"selector 'cls_attention' needs an attention layer before vision_feature_layer={layer!r}, which is the "
            "embedding output; use selector='uniform' with this layer"
        )
    attention = getattr(layers[hidden_index - 1], "self_attn", None)
    if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "head_dim", "scale")):
        raise ValueError(
            f"selector 'cls_attention' cannot read queries and keys from {tower_name}'s attention layers; "
            "use selector='uniform' with this model"
        )
    return attention


def cls_attention_scores(attention: nn.Module, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Attention of the [CLS] query (token 0) to every token, averaged over heads, from the layer's projected
    queries and keys (n, T, C): -> (n, T) float32."""
    batch, length = keys.shape[:2]
    query = queries[:, :1].reshape(batch, 1, -1, attention.head_dim).transpose(1, 2)
    key = keys.reshape(batch, length, -1, attention.head_dim).transpose(1, 2)
    logits = (query.float() @ key.float().mT) * attention.scale
    return logits.softmax(-1).mean(1).squeeze(1)


@contextmanager
def _capturing_cls_attention(attention: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Records the [CLS] attention of `attention` while the tower runs under any attention backend (e.g. SDPA).

    Hooks on the layer's own query and key projections take their outputs as they are computed, so the scores
    cost one (1 x T) product per head instead of a second pass through the projections.
    """
    captured: dict[str, torch.Tensor] = {}
    projections: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            projections[name] = (output[:, :1] if name == "queries" else output).detach()
            if projections.keys() == {"queries", "keys"}:
                with torch.no_grad():
                    captured["cls_attention"] = cls_attention_scores(attention, **projections)
                projections.clear()

        return record

    handles = [
        attention.q_proj.register_forward_hook(recorder("queries")),
        attention.k_proj.register_forward_hook(recorder("keys")),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class PrunedPrefillMixin:
    """What every pruning `*Model` shares: image features cut to per-image budgets, and a prefill `forward` on the
    shortened sequence. Placed before the stock model class in the bases; a variant implements `_prune` (from
    the stock features to the kept ones) and `image_energy_curves`."""

    config: Any
    model_output_class: type[ModelOutput]

    def __init__(self, config: Any) -> None:
        config.pruning  # noqa: B018 - settings passed to from_pretrained bypass the config's own check
        super().__init__(config)

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
        signals: dict[str, torch.Tensor] = {}
        if "cls_attention" in settings.token_selector.required_signals:
            with _capturing_cls_attention(_cls_attention_module(self.vision_tower, layer)) as signals:
                output = self._stock_image_features(**stock_kwargs)
            if strategy == "default":
                signals["cls_attention"] = signals["cls_attention"][:, 1:]
        else:
            output = self._stock_image_features(**stock_kwargs)
        return self._prune(output, signals, settings, layer, strategy, image_sizes)

    def _prune(
        self,
        output: BaseModelOutputWithPooling,
        signals: dict[str, torch.Tensor],
        settings: PruningSettings,
        layer: int | list[int],
        strategy: str,
        image_sizes: torch.Tensor | None,
    ) -> AdaPruneImageFeaturesOutput:
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
        return self._energy_curves(output, self.config.pruning, layer, strategy, image_sizes)

    def _energy_curves(
        self,
        output: BaseModelOutputWithPooling,
        settings: PruningSettings,
        layer: int | list[int],
        strategy: str,
        image_sizes: torch.Tensor | None,
    ) -> list[list[torch.Tensor]]:
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
        prefill = pruned_prefill_of(cache)
        if not _is_pruned(image_output):
            if prefill is not None:
                new_tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
                attention_mask, position_ids = prefill.step_inputs(
                    attention_mask, position_ids, new_tokens, cache.get_seq_length()
                )
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
        _check_placeholder_count(placeholders, image_output.tokens_per_image)
        _check_placeholders_attended(placeholders, attention_mask)
        kept_placeholders = torch.zeros_like(placeholders)
        kept_placeholders[placeholders] = placeholder_keep_flags(
            image_output.kept_indices, image_output.tokens_per_image
        )
        image_features = torch.cat(list(image_output.pooler_output)).to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(kept_placeholders.unsqueeze(-1), image_features)

        keep = attention_mask.bool() & (~placeholders | kept_placeholders)
        plan = left_compaction(keep)
        policy = self.config.pruning.position_policy
        positions = compacted_position_ids(plan, keep, attention_mask, position_ids, policy)
        outputs = self.language_model(
            inputs_embeds=plan.gather(inputs_embeds),
            attention_mask=plan.attention_mask,
            position_ids=positions,
            **cache_argument(cache),
            **kwargs,
        )
        new_cache = output_cache(outputs)
        if new_cache is not None:
            setattr(new_cache, PRUNED_PREFILL_ATTRIBUTE, pruned_prefill(plan, keep, attention_mask, policy))
        return self.model_output_class(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: new_cache},
            **image_output_fields(image_output),
            pruned_attention_mask=plan.attention_mask,
            pruned_position_ids=positions,
            source_index=plan.source_index,
            token_budgets=image_output.token_budgets,
        )


PRUNED_PREFILL_ATTRIBUTE = "adaprune_pruned_prefill"
"""The attribute under which a KV cache filled by a pruned prefill carries its `PrunedPrefill` layout (it travels
with the cache object: through `generate()`, copies and later calls)."""


def pruned_prefill_of(cache: Any) -> PrunedPrefill | None:
    """The layout of the pruned prefill that filled `cache`, or None for an empty, unpruned (or no) cache."""
    if cache is None or cache.get_seq_length() == 0:
        return None
    return getattr(cache, PRUNED_PREFILL_ATTRIBUTE, None)


class AdaPruneLlavaModel(PrunedPrefillMixin, LlavaModel):
    """`LlavaModel` whose image features are pruned per image and whose prefill runs on the shortened sequence."""

    config_class = AdaPruneConfig
    config: AdaPruneConfig
    model_output_class = AdaPruneModelOutputWithPast

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple | BaseModelOutputWithPooling:
        """Stock image features with each image cut to its budget: `pooler_output` holds the kept projected
        features, and `token_budgets`, `kept_indices` and `tokens_per_image` say what was kept."""
        return self._pruned_image_features(
            pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy, **kwargs
        )

    def _energy_curves(
        self,
        output: BaseModelOutputWithPooling,
        settings: PruningSettings,
        layer: int | list[int],
        strategy: str,
        image_sizes: torch.Tensor | None,
    ) -> list[list[torch.Tensor]]:
        _, spectrum_features = self._spectrum_inputs(output, settings, layer, strategy)
        return [[curve] for curve in settings.spectrum.curves(spectrum_features)]

    def _spectrum_inputs(
        self, output: BaseModelOutputWithPooling, settings: PruningSettings, layer: int | list[int], strategy: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (n, N, D) projected features and the (n, N, d) features whose spectra set the budgets."""
        token_counts = {len(features) for features in output.pooler_output}
        if len(token_counts) > 1:
            raise ValueError(
                f"images have different numbers of visual tokens {sorted(token_counts)}; the LLaVA pruning model "
                "needs equal-size images (omit image_sizes), or use the LLaVA-NeXT variant"
            )
        projected = torch.stack(list(output.pooler_output))
        if settings.spectrum_source == "projected":
            return projected, projected
        return projected, _projector_input(output.hidden_states, layer, strategy)

    def _prune(
        self,
        output: BaseModelOutputWithPooling,
        signals: dict[str, torch.Tensor],
        settings: PruningSettings,
        layer: int | list[int],
        strategy: str,
        image_sizes: torch.Tensor | None,
    ) -> AdaPruneImageFeaturesOutput:
        projected, spectrum_features = self._spectrum_inputs(output, settings, layer, strategy)
        checked = () if spectrum_features is projected else (projected,)
        pruning = prune_images(spectrum_features, signals, settings, checked_features=checked)
        return AdaPruneImageFeaturesOutput(
            last_hidden_state=output.last_hidden_state,
            pooler_output=pruning.kept_rows(projected),
            hidden_states=output.hidden_states,
            attentions=output.attentions,
            token_budgets=pruning.token_budgets,
            kept_indices=pruning.kept_indices,
            tokens_per_image=[projected.shape[1]] * projected.shape[0],
            visual_tokens_per_image=[projected.shape[1]] * projected.shape[0],
        )

    forward = with_signature_of(LlavaModel.forward)(PrunedPrefillMixin.forward)


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


def _check_placeholders_attended(placeholders: torch.BoolTensor, attention_mask: torch.Tensor) -> None:
    """Pruning picks each image's tokens without the attention mask, so a masked placeholder could silently take
    a kept slot (below min_tokens, or an empty row); refuse masks that hide image tokens."""
    hidden = placeholders & ~attention_mask.bool()
    if bool(hidden.any()):
        rows = sorted(set(hidden.nonzero()[:, 0].tolist()))
        raise ValueError(
            f"attention_mask hides {int(hidden.sum())} image placeholder tokens (rows {rows}); pruning chooses among "
            "all of an image's tokens, so unmask them (the processor's mask does) or disable pruning"
        )


def _check_placeholder_count(placeholders: torch.BoolTensor, tokens_per_image: list[int]) -> None:
    n_placeholders = int(placeholders.sum())
    if n_placeholders != sum(tokens_per_image):
        raise ValueError(
            f"the prompt has {n_placeholders} image placeholder tokens, but its {len(tokens_per_image)} images need "
            f"{sum(tokens_per_image)} ({tokens_per_image} per image); build the inputs with the model's processor so "
            "every image has its placeholders"
        )


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
            pruned_attention_mask=getattr(outputs, "pruned_attention_mask", None),
            pruned_position_ids=getattr(outputs, "pruned_position_ids", None),
            source_index=getattr(outputs, "source_index", None),
            token_budgets=getattr(outputs, "token_budgets", None),
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
        prefill = pruned_prefill_of(cache)
        if prefill is None:
            return super().generate(*args, **cache_argument(cache), **kwargs)  # type: ignore[misc]
        return self._generate_from_pruned_cache(cache, prefill, *args, **kwargs)

    def _generate_from_pruned_cache(self, cache: Any, prefill: PrunedPrefill, *args: Any, **kwargs: Any) -> Any:
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
        covered = prefill.covered_length(cache.get_seq_length())
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
        prefix = input_ids[:, :covered].repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prefix.to(sequences.device), sequences], dim=1)
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
        if not _is_pruned(image_output):
            return super()._expand_multimodal_outputs(  # type: ignore[misc]
                input_ids, mm_encoder_output, expand_size, inputs_embeds
            )
        placeholders_per_row = self.model.image_placeholder_mask(input_ids, inputs_embeds).sum(-1).tolist()
        groups = images_per_row(placeholders_per_row, image_output.tokens_per_image)
        order = [image for group in groups for _ in range(expand_size) for image in group]
        return {**mm_encoder_output, "image": image_output.select_images(order)}


class AdaPruneLlavaForConditionalGeneration(PrunedGenerationMixin, LlavaForConditionalGeneration, GenerationMixin):
    """`LlavaForConditionalGeneration` with E-AdaPrune: same inputs, same `generate()`, shorter prefill."""

    config_class = AdaPruneConfig
    config: AdaPruneConfig
    causal_lm_output_class = AdaPruneCausalLMOutputWithPast

    def __init__(self, config: AdaPruneConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = AdaPruneLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    forward = with_signature_of(LlavaForConditionalGeneration.forward)(PrunedGenerationMixin.forward)


@dataclass(frozen=True)
class _UnitBatch:
    """Budget units of equal length, stacked: the group to prune, and each unit's packed positions (u, N)."""

    group: UnitGroup
    positions: torch.LongTensor
    unit_ids: list[int]


class AdaPruneLlavaNextModel(PrunedPrefillMixin, LlavaNextModel):
    """`LlavaNextModel` whose any-resolution image features are pruned per image (or per crop) and whose prefill
    runs on the shortened sequence.

    An image's visual tokens are its base crop and its unpadded high-resolution grid; its newline tokens (one per
    grid row) are not part of any spectrum. With `budget_scope="image"` one spectrum and one budget cover all its
    visual tokens; with "crop" every crop gets its own. `newline_policy="keep_rows"` then keeps the newline of every
    grid row that kept a token, "drop" drops them all. `kept_indices` index the image's packed sequence (newlines
    included); `packed_layout(image_size)` says which crop, patch and grid row each position is.
    """

    config_class = AdaPruneLlavaNextConfig
    config: AdaPruneLlavaNextConfig
    model_output_class = AdaPruneLlavaNextModelOutputWithPast

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> tuple | BaseModelOutputWithPooling:
        """Stock packed image features with each image cut to its budget: `pooler_output` holds the kept packed
        features (kept newlines included), `token_budgets` the visual tokens kept per image (newlines excluded),
        `kept_indices` their positions in the packed sequence and `tokens_per_image` its length."""
        return self._pruned_image_features(
            pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy, **kwargs
        )

    def _stock_image_features(self, **stock_kwargs: Any) -> BaseModelOutputWithPooling:
        if stock_kwargs.get("image_sizes") is None:
            raise ValueError(
                "LLaVA-NeXT image features need image_sizes (one (height, width) per image); pass the processor's"
            )
        return super()._stock_image_features(**stock_kwargs)

    def packed_layout(self, image_size: tuple[int, int] | torch.Tensor) -> PackedLayout:
        """Where each position of the packed feature sequence of an image of `image_size` (height, width) comes
        from: crop, patch within the crop, grid row, or newline (see `anyres_layout.PackedLayout`)."""
        return config_packed_layout(self.config, image_size)

    def _layouts(self, image_sizes: torch.Tensor, packed: list[torch.Tensor]) -> list[PackedLayout]:
        layouts = [self.packed_layout(size) for size in image_sizes.tolist()]
        lengths = [len(layout) for layout in layouts]
        if lengths != [len(features) for features in packed]:
            raise ValueError(
                f"the packed image features have {[len(features) for features in packed]} tokens per image, but the "
                f"any-resolution layout of image_sizes {image_sizes.tolist()} gives {lengths}; this model needs "
                "vision_feature_select_strategy='default' and the processor's image_sizes"
            )
        return layouts

    def _unit_batches(
        self,
        output: BaseModelOutputWithPooling,
        signals: dict[str, torch.Tensor],
        settings: AnyResPruningSettings,
        layer: int | list[int],
        strategy: str,
        layouts: list[PackedLayout],
    ) -> list[_UnitBatch]:
        """The batch's budget units, grouped by length, with their spectrum features, signals and packed rows."""
        packed = list(output.pooler_output)
        device = packed[0].device
        crops_per_image = [1 + layout.grid_shape[0] * layout.grid_shape[1] for layout in layouts]
        patches = layouts[0].patches_per_side ** 2
        # Per image, rows aligned with its packed positions (newline rows are placeholders no unit uses).
        source_rows = [((layout.crop * patches + layout.patch).clamp_min(0)).to(device) for layout in layouts]
        if settings.spectrum_source == "projected":
            spectrum = packed
        else:
            vision = _projector_input(output.hidden_states, layer, strategy).split(crops_per_image)
            spectrum = [crops.flatten(0, 1)[rows] for crops, rows in zip(vision, source_rows)]
        per_image_signals = {
            name: [crops.flatten(0, 1)[rows] for crops, rows in zip(values.split(crops_per_image), source_rows)]
            for name, values in signals.items()
        }

        by_length: dict[int, list[tuple[int, int, torch.LongTensor]]] = {}
        for unit_id, (image, positions) in enumerate(budget_units(layouts, settings.budget_scope)):
            by_length.setdefault(len(positions), []).append((unit_id, image, positions))
        batches = []
        for units in by_length.values():
            images = [image for _, image, _ in units]
            positions = torch.stack([unit_positions for _, _, unit_positions in units]).to(device)

            def stacked(per_image: list[torch.Tensor]) -> torch.Tensor:
                return torch.stack([per_image[image][rows] for image, rows in zip(images, positions)])

            group = UnitGroup(
                spectrum_features=stacked(spectrum),
                signals={name: stacked(values) for name, values in per_image_signals.items()},
                checked_features=() if spectrum is packed else (stacked(packed),),
                images=images,
            )
            batches.append(_UnitBatch(group=group, positions=positions, unit_ids=[unit_id for unit_id, _, _ in units]))
        return batches

    def _energy_curves(
        self,
        output: BaseModelOutputWithPooling,
        settings: AnyResPruningSettings,
        layer: int | list[int],
        strategy: str,
        image_sizes: torch.Tensor | None,
    ) -> list[list[torch.Tensor]]:
        layouts = self._layouts(image_sizes, list(output.pooler_output))
        curves: list[list[tuple[int, torch.Tensor]]] = [[] for _ in layouts]
        for batch in self._unit_batches(output, {}, settings, layer, strategy, layouts):
            unit_curves = settings.spectrum.curves(batch.group.spectrum_features)
            for unit_id, image, curve in zip(batch.unit_ids, batch.group.images, unit_curves):
                curves[image].append((unit_id, curve))
        return [[curve for _, curve in sorted(units, key=lambda unit: unit[0])] for units in curves]

    def _prune(
        self,
        output: BaseModelOutputWithPooling,
        signals: dict[str, torch.Tensor],
        settings: AnyResPruningSettings,
        layer: int | list[int],
        strategy: str,
        image_sizes: torch.Tensor | None,
    ) -> AdaPruneImageFeaturesOutput:
        packed = list(output.pooler_output)
        layouts = self._layouts(image_sizes, packed)
        batches = self._unit_batches(output, signals, settings, layer, strategy, layouts)
        prunings = prune_groups([batch.group for batch in batches], settings)

        device = packed[0].device
        n_images, longest = len(packed), max(len(layout) for layout in layouts)
        keep = torch.zeros(n_images * longest, dtype=torch.long, device=device)
        token_budgets = torch.zeros(n_images, dtype=torch.long, device=device)
        for batch, pruning in zip(batches, prunings):
            unit_length = batch.positions.shape[1]
            kept_local = pruning.padded_kept_indices
            kept_positions = batch.positions.gather(1, kept_local.clamp_max(unit_length - 1))
            images = torch.tensor(batch.group.images, device=device)
            flat = images.unsqueeze(1) * longest + kept_positions
            keep.scatter_reduce_(0, flat.flatten(), (kept_local < unit_length).long().flatten(), reduce="amax")
            token_budgets.index_add_(0, images, pruning.token_budgets)
        keep = keep.view(n_images, longest).bool()
        if settings.newline_policy == "keep_rows":
            keep = with_row_newlines(
                keep,
                pad_sequence([layout.row for layout in layouts], batch_first=True, padding_value=-1).to(device),
                pad_sequence([layout.is_newline for layout in layouts], batch_first=True).to(device),
            )
        _, kept_indices = kept_indices_from_mask(keep, keep.sum(-1).tolist())
        return AdaPruneImageFeaturesOutput(
            last_hidden_state=output.last_hidden_state,
            pooler_output=[features[kept] for features, kept in zip(packed, kept_indices)],
            hidden_states=output.hidden_states,
            attentions=output.attentions,
            token_budgets=token_budgets,
            kept_indices=kept_indices,
            tokens_per_image=[len(layout) for layout in layouts],
            visual_tokens_per_image=[len(layout.token_positions) for layout in layouts],
        )

    forward = with_signature_of(LlavaNextModel.forward)(PrunedPrefillMixin.forward)


class AdaPruneLlavaNextForConditionalGeneration(
    PrunedGenerationMixin, LlavaNextForConditionalGeneration, GenerationMixin
):
    """`LlavaNextForConditionalGeneration` with E-AdaPrune: same inputs, same `generate()`, shorter prefill."""

    config_class = AdaPruneLlavaNextConfig
    config: AdaPruneLlavaNextConfig
    causal_lm_output_class = AdaPruneLlavaNextCausalLMOutputWithPast

    def __init__(self, config: AdaPruneLlavaNextConfig) -> None:
        LlavaNextPreTrainedModel.__init__(self, config)
        self.model = AdaPruneLlavaNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    forward = with_signature_of(LlavaNextForConditionalGeneration.forward)(PrunedGenerationMixin.forward)


def _register_checkpoint_renames() -> None:
    """Stock llava checkpoints use transformers-4 weight names, renamed on load by model type and class name;
    a new model type (or remote code) gets no renames unless registered, and would load random weights."""
    for ours, stock in (
        ("llava_adaprune", "llava"),
        ("AdaPruneLlavaModel", "LlavaModel"),
        ("llava_next_adaprune", "llava_next"),
        ("AdaPruneLlavaNextModel", "LlavaNextModel"),
    ):
        register_checkpoint_conversion_mapping(ours, get_checkpoint_conversion_mapping(stock), overwrite=True)


_register_checkpoint_renames()
AdaPruneConfig.register_for_auto_class()
AdaPruneLlavaModel.register_for_auto_class("AutoModel")
AdaPruneLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
AdaPruneLlavaNextConfig.register_for_auto_class()
AdaPruneLlavaNextModel.register_for_auto_class("AutoModel")
AdaPruneLlavaNextForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "AdaPruneCausalLMOutputWithPast",
    "AdaPruneImageFeaturesOutput",
    "AdaPruneLlavaForConditionalGeneration",
    "AdaPruneLlavaModel",
    "AdaPruneLlavaNextCausalLMOutputWithPast",
    "AdaPruneLlavaNextForConditionalGeneration",
    "AdaPruneLlavaNextModel",
    "AdaPruneLlavaNextModelOutputWithPast",
    "AdaPruneModelOutputWithPast",
]
