"""The oracle: pruning equals the stock model with the attention mask zeroed at the dropped image tokens.

Same weights; the pruned model's greedy tokens and its logits (every generation step, and every kept position of a
plain forward) must match stock `LlavaForConditionalGeneration` fed the full sequence with those positions masked.
"""

from __future__ import annotations

import random

import pytest
from support.oracle import assert_matches_oracle, llava15_case, load_pruned, random_prompts
from transformers import LlavaProcessor

from adaprune.tools.tiny_llava import SMALL_GEOMETRY, build_config, build_processor, build_stock_model


@pytest.mark.parametrize("seed", range(10))
def test_random_batches_match_masked_stock_model(
    seed: int, small_checkpoint, small_processor: LlavaProcessor, small_stock, small_images: dict
) -> None:
    """Batch 1-4, left padding, 0-2 images per prompt, random budgets, both policies and selectors."""
    rng = random.Random(seed)
    pruned = load_pruned(
        small_checkpoint,
        energy_ratio=rng.uniform(0.6, 0.99),
        min_tokens=rng.randint(1, 8),
        position_policy=rng.choice(["compact", "original"]),
        selector=rng.choice(["cls_attention", "uniform"]),
    )
    prompts, counts = random_prompts(rng, batch=rng.randint(1, 4))
    images = [rng.choice(list(small_images.values())) for _ in range(sum(counts))]
    inputs = small_processor(images=images, text=prompts, padding=True, return_tensors="pt")

    budgets = assert_matches_oracle(pruned, small_stock, inputs).token_budgets
    assert budgets.shape == (sum(counts),)


@pytest.mark.parametrize("position_policy", ["compact", "original"])
def test_llava15_geometry_matches_masked_stock_model(
    position_policy: str, llava15_checkpoint, llava15_images: dict
) -> None:
    """576 tokens per image, vision width 1024: different budgets per row, two images in one prompt."""
    stock, inputs = llava15_case(llava15_checkpoint, llava15_images)
    pruned = load_pruned(llava15_checkpoint, energy_ratio=0.9, min_tokens=4, position_policy=position_policy)
    assert int((inputs["input_ids"] == pruned.config.image_token_id).sum()) == 3 * 576

    budgets = assert_matches_oracle(pruned, stock, inputs).token_budgets
    assert len(set(budgets.tolist())) == 3
    assert int(budgets.max()) < 576


@pytest.mark.parametrize(
    ("strategy", "layer"),
    [("full", -2), ("default", [-3, -1])],
    ids=["full-strategy-with-cls-token", "two-feature-layers"],
)
def test_other_feature_selections_match_masked_stock_model(
    strategy: str, layer: int | list[int], tmp_path, small_images: dict
) -> None:
    """The [CLS] token as an image token ("full"), and features concatenated from several layers."""
    processor = build_processor(SMALL_GEOMETRY)
    processor.vision_feature_select_strategy = strategy
    config = build_config(processor, SMALL_GEOMETRY)
    config.vision_feature_select_strategy = strategy
    config.vision_feature_layer = layer
    stock = build_stock_model(config)
    stock.save_pretrained(tmp_path)
    pruned = load_pruned(tmp_path, energy_ratio=0.9, min_tokens=2)
    prompts = ["USER: <image> describe ASSISTANT:", "USER: a <image> and <image> ASSISTANT:"]
    images = [small_images["busy"], small_images["shapes"], small_images["plain"]]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    tokens = SMALL_GEOMETRY.tokens_per_image + (strategy == "full")
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 3 * tokens

    budgets = assert_matches_oracle(pruned, stock, inputs).token_budgets
    assert int(budgets.max()) < tokens
