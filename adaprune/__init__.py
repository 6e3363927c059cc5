"""adaprune: visual-token pruning for vision-language models, as drop-in Hugging Face transformers models.

Importing the package registers the pruning models with the transformers Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_adaprune import AdaPruneConfig, AdaPruneLlavaNextConfig, AnyResPruningSettings, PruningSettings
from .methods import BUDGET_RULES, SELECTORS, register, registered
from .modeling_adaprune import (
    AdaPruneCausalLMOutputWithPast,
    AdaPruneImageFeaturesOutput,
    AdaPruneLlavaForConditionalGeneration,
    AdaPruneLlavaModel,
    AdaPruneLlavaNextCausalLMOutputWithPast,
    AdaPruneLlavaNextForConditionalGeneration,
    AdaPruneLlavaNextModel,
    AdaPruneLlavaNextModelOutputWithPast,
    AdaPruneModelOutputWithPast,
)
from .settings import BudgetRule, TokenSelector, setting

for _config, _model, _generation_model in (
    (AdaPruneConfig, AdaPruneLlavaModel, AdaPruneLlavaForConditionalGeneration),
    (AdaPruneLlavaNextConfig, AdaPruneLlavaNextModel, AdaPruneLlavaNextForConditionalGeneration),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForImageTextToText.register(_config, _generation_model, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "BUDGET_RULES",
    "BudgetRule",
    "SELECTORS",
    "TokenSelector",
    "register",
    "registered",
    "setting",
    "AdaPruneCausalLMOutputWithPast",
    "AdaPruneConfig",
    "AdaPruneImageFeaturesOutput",
    "AdaPruneLlavaForConditionalGeneration",
    "AdaPruneLlavaModel",
    "AdaPruneLlavaNextCausalLMOutputWithPast",
    "AdaPruneLlavaNextConfig",
    "AdaPruneLlavaNextForConditionalGeneration",
    "AdaPruneLlavaNextModel",
    "AdaPruneLlavaNextModelOutputWithPast",
    "AdaPruneModelOutputWithPast",
    "AnyResPruningSettings",
    "PruningSettings",
]
