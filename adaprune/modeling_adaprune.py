"""LLaVA with E-AdaPrune visual-token pruning, as drop-in transformers models.

`get_image_features` computes each image's budget and kept tokens and returns only the kept projected features.
The prefill `forward` then removes the dropped image placeholders from the sequence (embeddings, attention mask,
position ids, labels), re-pads rows on the left and runs the language model on the shorter batch. The cache it
fills carries that layout (`sequence_compaction.PruningState`), so later steps, in `generate()` or a caller's own loop, keep passing
the mask and positions of the caller's full sequence and are mapped onto the shorter cache; the returned sequences
keep the caller's full prompt. Differences between transformers releases live in `compat`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    GenerationMixin,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaPreTrainedModel,
)
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple

from .anyres_layout import PackedLayout, config_packed_layout
from .anyres_pruning import packed_energy_curves, packed_selection_units, prune_packed_images
from .compat import (
    with_signature_of,
)
from .configuration_adaprune import AdaPruneConfig, AdaPruneLlavaNextConfig, AnyResPruningSettings, PruningSettings
from .decoder_pruning import SelectionUnits
from .image_pruning import prune_images
from .pruned_generation import PrunedGenerationMixin
from .pruned_prefill import PrunedPrefillMixin
from .pruning_outputs import (
    AdaPruneCausalLMOutputWithPast,
    AdaPruneImageFeaturesOutput,
    AdaPruneLlavaNextCausalLMOutputWithPast,
    AdaPruneLlavaNextModelOutputWithPast,
    AdaPruneModelOutputWithPast,
)
from .vision_probes import TowerFeatures


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

    def _energy_curves(self, features: TowerFeatures, settings: PruningSettings) -> list[list[torch.Tensor]]:
        _, spectrum_features = self._spectrum_inputs(features, settings)
        return [[curve] for curve in settings.spectrum.curves(spectrum_features)]

    def _spectrum_inputs(self, features: TowerFeatures, settings: PruningSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """The (n, N, D) projected features and the (n, N, d) features whose spectra set the budgets."""
        token_counts = {len(image) for image in features.output.pooler_output}
        if len(token_counts) > 1:
            raise ValueError(
                f"images have different numbers of visual tokens {sorted(token_counts)}; the LLaVA pruning model "
                "needs equal-size images (omit image_sizes), or use the LLaVA-NeXT variant"
            )
        projected = torch.stack(list(features.output.pooler_output))
        if settings.spectrum_source == "projected":
            return projected, projected
        return projected, features.projector_input()

    def _prune(
        self, features: TowerFeatures, signals: dict[str, torch.Tensor], settings: PruningSettings
    ) -> AdaPruneImageFeaturesOutput:
        output = features.output
        projected, spectrum_features = self._spectrum_inputs(features, settings)
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
            unit_budgets=list(pruning.token_budgets.unsqueeze(-1)),
            cls_attention=list(signals["cls_attention"]) if "cls_attention" in signals else None,
        )

    def _selection_units(self, image_output: AdaPruneImageFeaturesOutput, settings: PruningSettings) -> SelectionUnits:
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        n_tokens = image_output.tokens_per_image[0]
        square = side * side == n_tokens  # not with the [CLS] token of the 'full' strategy
        return SelectionUnits.whole_images(image_output.token_budgets, n_tokens, side if square else None)

    forward = with_signature_of(LlavaModel.forward)(PrunedPrefillMixin.forward)


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

    def _layouts(self, features: TowerFeatures) -> list[PackedLayout]:
        """Each image's packed layout, checked against its packed features."""
        image_sizes, packed = features.image_sizes, list(features.output.pooler_output)
        layouts = [self.packed_layout(size) for size in image_sizes.tolist()]
        lengths = [len(layout) for layout in layouts]
        if lengths != [len(image) for image in packed]:
            raise ValueError(
                f"the packed image features have {[len(image) for image in packed]} tokens per image, but the "
                f"any-resolution layout of image_sizes {image_sizes.tolist()} gives {lengths}; this model needs "
                "vision_feature_select_strategy='default' and the processor's image_sizes"
            )
        return layouts

    def _energy_curves(self, features: TowerFeatures, settings: AnyResPruningSettings) -> list[list[torch.Tensor]]:
        return packed_energy_curves(features, settings, self._layouts(features))

    def _prune(
        self, features: TowerFeatures, signals: dict[str, torch.Tensor], settings: AnyResPruningSettings
    ) -> AdaPruneImageFeaturesOutput:
        return prune_packed_images(features, signals, settings, self._layouts(features))

    def _selection_units(
        self, image_output: AdaPruneImageFeaturesOutput, settings: AnyResPruningSettings
    ) -> SelectionUnits:
        return packed_selection_units(
            image_output.packed_layouts, image_output.unit_budgets, settings, image_output.token_budgets.device
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
