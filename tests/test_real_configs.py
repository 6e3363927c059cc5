"""Real llava-hf configurations (transformers-4 era config.json) build the same architecture under pruning."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from adaprune import AdaPruneConfig, AdaPruneLlavaForConditionalGeneration
from adaprune.configuration_adaprune import PruningSettings

LLAVA_15_7B = Path(__file__).parent / "data" / "llava-1.5-7b-hf"


def test_llava_15_7b_config_gives_the_stock_architecture() -> None:
    """llava-hf/llava-1.5-7b-hf's config.json: same settings, and on the meta device the same 7B parameters."""
    stock_config = LlavaConfig.from_pretrained(LLAVA_15_7B)
    config = AdaPruneConfig.from_pretrained(LLAVA_15_7B, energy_ratio=0.8)
    assert config.model_type == "llava_adaprune"
    assert config.pruning == PruningSettings(energy_ratio=0.8)

    stock_fields, fields = stock_config.to_dict(), config.to_dict()
    pruning_fields = set(PruningSettings.field_names()) | {"model_type"}
    shared = (stock_fields.keys() | fields.keys()) - pruning_fields
    assert {key: fields.get(key) for key in shared} == {key: stock_fields.get(key) for key in shared}
    assert fields["model_type"] == "llava_adaprune" and stock_fields["model_type"] == "llava"
    with torch.device("meta"):
        stock = LlavaForConditionalGeneration(stock_config)
        pruned = AdaPruneLlavaForConditionalGeneration(config)
    shapes = {name: tensor.shape for name, tensor in stock.state_dict().items()}
    assert shapes == {name: tensor.shape for name, tensor in pruned.state_dict().items()}
    assert sum(parameter.numel() for parameter in pruned.parameters()) > 7e9
