"""Pruning inside the language model (FastV, AdaptPrune, AutoPrune): the oracle is the stock model fed the full
sequence with the tokens the vision stage dropped masked in every layer and those dropped at each cut layer hidden
from every query of the layers from that cut on.

Randomized over batch size, left padding, images per prompt, budgets per row, vision stage on and off, and
decoder families (Llama, Qwen2 with grouped-query attention and q/k/v biases, Mistral), all on SDPA.
"""

from __future__ import annotations

import random

import pytest
import torch
from support.oracle import (
    assert_matches_layer_oracle,
    assert_turns_match_oracle,
    image_features,
    llava15_case,
    load_pruned,
    random_prompts,
)
from transformers import MistralConfig, Qwen2Config

from adaprune.anyres_layout import budget_units
from adaprune.compat import CACHE_ARGUMENT
from adaprune.tools.tiny_llava import SMALL_GEOMETRY, build_config, build_processor, build_stock_model


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
    processor = build_processor(SMALL_GEOMETRY)
    config = build_config(processor, SMALL_GEOMETRY)
    config.text_config = text_config(request.param, config.text_config)
    stock = build_stock_model(config)
    directory = tmp_path_factory.mktemp(f"llava-{request.param}")
    stock.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, processor, stock


@pytest.mark.parametrize("seed", range(6))
def test_random_batches_match_the_layer_masked_stock_model(seed: int, family_checkpoint, small_images: dict) -> None:
    checkpoint, processor, stock = family_checkpoint
    rng = random.Random(seed)
    budget = rng.choice([{"budget_mode": "fixed", "fixed_tokens": rng.randint(1, 12)}, {"energy_ratio": 0.9}])
    vision_stage = rng.choice(
        [{}, {"vision_stage_selector": "cls_attention", "vision_stage_tokens": rng.randint(8, 40)}]
    )
    pruned = load_pruned(
        checkpoint,
        selector=rng.choice(["fastv", "adaptprune", "autoprune"]),
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


@pytest.mark.parametrize("selector", ["fastv", "adaptprune"])
def test_llava15_geometry_with_energy_budgets_matches_the_oracle(
    selector: str, llava15_checkpoint, llava15_images: dict
) -> None:
    """576 tokens per image, vision width 1024: each image's E-AdaPrune budget, chosen inside the language model."""
    stock, inputs = llava15_case(llava15_checkpoint, llava15_images)
    pruned = load_pruned(llava15_checkpoint, selector=selector, prune_layer=1, energy_ratio=0.9, min_tokens=4)

    assert_matches_layer_oracle(pruned, stock, inputs, max_new_tokens=3)
    with torch.no_grad():
        output = pruned(**inputs)
    budgets = output.token_budgets.tolist()
    assert len(set(budgets)) == 3 and max(budgets) < 576
    assert [len(kept) for kept in output.kept_indices_by_layer[0]] == [576] * 3
    assert [len(kept) for kept in output.kept_indices_by_layer[1]] == budgets


def test_prune_layer_outside_the_language_model_is_refused(small_checkpoint) -> None:
    with pytest.raises(ValueError, match=r"prune_layer must be a decoder layer after the first, 1 to 3 .* got 4"):
        load_pruned(small_checkpoint, selector="fastv", prune_layer=4)
    model = load_pruned(small_checkpoint, selector="fastv", prune_layer=1)
    model.config.prune_layer = 5
    with pytest.raises(ValueError, match=r"1 to 3 for this language model of 4 layers, got 5"):
        model.get_image_features(pixel_values=torch.zeros(1, 3, 112, 112))


def test_sliding_window_layers_are_refused(tmp_path) -> None:
    """A sliding window counts cache entries, which in-LLM pruning removes: refused, naming the fix."""
    processor = build_processor(SMALL_GEOMETRY)
    config = build_config(processor, SMALL_GEOMETRY)
    config.text_config = MistralConfig(**{**text_config("mistral", config.text_config).to_dict(), "sliding_window": 64})
    build_stock_model(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layers \[2, 3\] use a sliding window .* text_config.sliding_window=None"):
        load_pruned(tmp_path, selector="fastv")


def test_adaptprune_needs_a_patch_grid(tmp_path, small_images: dict) -> None:
    """With the 'full' strategy an image's tokens include [CLS] and are no square grid."""
    processor = build_processor(SMALL_GEOMETRY)
    processor.vision_feature_select_strategy = "full"
    config = build_config(processor, SMALL_GEOMETRY)
    config.vision_feature_select_strategy = "full"
    build_stock_model(config).save_pretrained(tmp_path)
    pruned = load_pruned(tmp_path, selector="adaptprune", budget_mode="fixed", fixed_tokens=4)
    inputs = processor(images=[small_images["busy"]], text=["USER: <image> hi ASSISTANT:"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"'adaptprune' places each image's tokens on a square patch grid"):
        pruned(**inputs)
    load_pruned(tmp_path, selector="fastv", budget_mode="fixed", fixed_tokens=4)(**inputs)


@pytest.mark.parametrize(
    ("scope", "newlines", "selector"),
    [
        ("image", "keep_rows", "adaptprune"),
        ("crop", "drop", "adaptprune"),
        ("crop", "keep_rows", "fastv"),
        ("crop", "keep_rows", "autoprune"),
        ("image", "drop", "autoprune"),
    ],
)
def test_llava_next_packed_crops_match_the_layer_masked_stock_model(
    scope: str, newlines: str, selector: str, next_checkpoint, next_processor, next_stock, next_images: dict
) -> None:
    """Two images of different aspect ratios in one prompt, a text-only prompt and a third size alone, with
    E-AdaPrune budgets per image or per crop: equal to the layer-masked stock model. At every cut each budget unit
    keeps its own count (its budget; for AutoPrune its schedule's count for that layer), and newlines are never
    chosen: they stay with a row that keeps a token ("keep_rows") or never reach the language model ("drop")."""
    pruned = load_pruned(
        next_checkpoint,
        selector=selector,
        prune_layer=1,
        energy_ratio=0.9,
        min_tokens=4,
        budget_scope=scope,
        newline_policy=newlines,
    )
    prompts = ["USER: <image> and <image> compare ASSISTANT:", "USER: a dog ? ASSISTANT:", "USER: <image> ASSISTANT:"]
    images = [next_images["wide"], next_images["tall"], next_images["large"]]
    inputs = dict(next_processor(images=images, text=prompts, padding=True, return_tensors="pt"))
    assert_matches_layer_oracle(pruned, next_stock, inputs)

    with torch.no_grad():
        output = pruned(**inputs)
        vision_stage = image_features(pruned, inputs)
    assert [len(kept) for kept in vision_stage.unit_budgets] == ([1] * 3 if scope == "image" else [3, 3, 5])
    units_per_image = [len(budgets) for budgets in vision_stage.unit_budgets]
    for layer in sorted(set(output.kept_indices_by_layer) - {0}):
        if output.selector_report is None:
            counts = vision_stage.unit_budgets
        else:
            counts = output.selector_report["tokens_per_layer"][:, layer - 1].split(units_per_image)
        for kept, layout, unit_counts in zip(output.kept_indices_by_layer[layer], vision_stage.packed_layouts, counts):
            units = budget_units([layout], scope)
            assert [int(torch.isin(kept, positions).sum()) for _, positions in units] == unit_counts.tolist()
            is_newline = layout.is_newline[kept]
            expected_rows = set(layout.row[kept[~is_newline]].tolist()) - {-1} if newlines == "keep_rows" else set()
            assert set(layout.row[kept[is_newline]].tolist()) == expected_rows


def test_conversations_continue_the_per_layer_cache(family_checkpoint, small_images: dict) -> None:
    """Three turns reuse the cache whose layers hold different lengths: every turn equals the stock model
    continuing its own cache with the prompt's dropped tokens hidden from layer K on."""
    checkpoint, processor, stock = family_checkpoint
    pruned = load_pruned(checkpoint, selector="adaptprune", budget_mode="fixed", fixed_tokens=5)
    prompts = ["USER: <image> what is this ASSISTANT:", "USER: a <image> and <image> ASSISTANT:"]
    images = [small_images["busy"], small_images["shapes"], small_images["plain"]]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    turn = processor.tokenizer(["USER: and the sky ? ASSISTANT:"], add_special_tokens=False)["input_ids"][0]

    # a random model may generate the image token, which would read as a new image's placeholder
    no_image_token = {"suppress_tokens": [pruned.config.image_token_id]}
    assert_turns_match_oracle(pruned, stock, inputs, turn, CACHE_ARGUMENT, **no_image_token)
