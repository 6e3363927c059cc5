"""adaprune: visual-token pruning for vision-language models, as drop-in Hugging Face transformers models.

Importing the package registers the pruning models with the transformers Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_adaprune import AdaPruneConfig, PruningSettings
from .modeling_adaprune import (
    AdaPruneCausalLMOutputWithPast,
    AdaPruneImageFeaturesOutput,
    AdaPruneLlavaForConditionalGeneration,
    AdaPruneLlavaModel,
    AdaPruneModelOutputWithPast,
)

AutoConfig.register(AdaPruneConfig.model_type, AdaPruneConfig, exist_ok=True)
AutoModel.register(AdaPruneConfig, AdaPruneLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(AdaPruneConfig, AdaPruneLlavaForConditionalGeneration, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "AdaPruneCausalLMOutputWithPast",
    "AdaPruneConfig",
    "AdaPruneImageFeaturesOutput",
    "AdaPruneLlavaForConditionalGeneration",
    "AdaPruneLlavaModel",
    "AdaPruneModelOutputWithPast",
    "PruningSettings",
]
