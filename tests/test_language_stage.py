"""Pruning inside the language model (FastV): the oracle is the stock model fed the full sequence with the tokens
the vision stage dropped masked in every layer and those dropped at layer K hidden from every query of layers >= K.

Randomized over batch size, left padding, images per prompt, budgets per row, vision stage on and off, and
decoder families (Llama, Qwen2 with grouped-query attention and q/k/v biases, Mistral), all on SDPA.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from support.oracle import assert_matches_layer_oracle, load_pruned, random_prompts
from transformers import MistralConfig, Qwen2Config

from adaprune.tools.tiny_llava import SMALL_GEOMETRY, build_config, build_processor, build_stock_model

GEOMETRY = dataclasses.replace(SMALL_GEOMETRY, text_layers=4)


def text_config(family: str, llama):
    """The language model of `family` with the sizes of the tiny Llama one (Qwen2 and Mistral with 2 key/value
    heads for the 4 query heads)."""
    if family == "llama":
        return llama
    sizes = {
        "vocab_size": llama.vocab_size,
        "hidden_size": llama.hidden_size,
        "intermediate_size": llama.intermediate_size,
        "num_hidden_layers": llama.num_hidden_layers,
        "num_attention_heads": llama.num_attention_heads,
        "num_key_value_heads": 2,
        "pad_token_id": llama.pad_token_id,
        "bos_token_id": llama.bos_token_id,
        "eos_token_id": llama.eos_token_id,
    }
    if family == "qwen2":
        return Qwen2Config(**sizes)
    return MistralConfig(**sizes, sliding_window=None)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def family_checkpoint(request, tmp_path_factory):
    """(checkpoint, processor, stock model) with a 4-layer language model of each family."""
    processor = build_processor(GEOMETRY)
    config = build_config(processor, GEOMETRY)
    config.text_config = text_config(request.param, config.text_config)
    stock = build_stock_model(config)
    directory = tmp_path_factory.mktemp(f"llava-{request.param}")
    stock.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, processor, stock


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_match_the_layer_masked_stock_model(seed: int, family_checkpoint, small_images: dict) -> None:
    checkpoint, processor, stock = family_checkpoint
    rng = random.Random(seed)
    budget = rng.choice([{"budget_mode": "fixed", "fixed_tokens": rng.randint(1, 12)}, {"energy_ratio": 0.9}])
    vision_stage = rng.choice(
        [{}, {"vision_stage_selector": "cls_attention", "vision_stage_tokens": rng.randint(8, 40)}]
    )
    pruned = load_pruned(
        checkpoint,
        selector="fastv",
        prune_layer=rng.randint(1, 3),
        min_tokens=rng.randint(1, 6),
        position_policy=rng.choice(["compact", "original"]),
        **budget,
        **vision_stage,
    )
    prompts, counts = random_prompts(rng, batch=rng.randint(1, 4))
    images = [rng.choice(list(small_images.values())) for _ in range(sum(counts))]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")

    assert_matches_layer_oracle(pruned, stock, inputs)


@pytest.mark.parametrize(
    "generation",
    [
        {"num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "top_k": 5, "seed": 3},
        {"num_return_sequences": 2, "do_sample": True, "seed": 1},
    ],
    ids=["beams", "sampling", "return-sequences"],
)
def test_generation_modes_match_the_layer_masked_stock_model(
    generation: dict, family_checkpoint, small_images: dict
) -> None:
    checkpoint, processor, stock = family_checkpoint
    pruned = load_pruned(checkpoint, selector="fastv", budget_mode="fixed", fixed_tokens=6)
    prompts = ["USER: <image> what is this ASSISTANT:", "USER: a <image> and <image> ASSISTANT:"]
    images = [small_images["busy"], small_images["shapes"], small_images["plain"]]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")

    assert_matches_layer_oracle(pruned, stock, inputs, **generation)
