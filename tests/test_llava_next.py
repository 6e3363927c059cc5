"""The LLaVA-NeXT pruning model: the oracle, batch invariance, budgets, newline tokens, and errors.

Tiny LLaVA-NeXT with the real geometry (336 px crops, patch 14, llava-hf's grid pinpoints) and images of several
sizes and aspect ratios, so images have different grids, unpadding and packed lengths in one batch.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from support.oracle import (
    assert_matches_oracle,
    assert_turns_match_oracle,
    image_features,
    load_pruned,
    max_abs_diff,
    oracle_inputs,
    random_prompts,
)
from transformers import (
    DynamicCache,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)

from adaprune import (
    AdaPruneLlavaNextConfig,
    AdaPruneLlavaNextForConditionalGeneration,
)
from adaprune.compat import output_cache
from adaprune.spectral_budget import budgets_from_curves

COMBINATIONS = [(scope, newlines) for scope in ("image", "crop") for newlines in ("keep_rows", "drop")]


def processed(processor: LlavaNextProcessor, images: list, prompts: list[str]) -> dict:
    return dict(processor(images=images or None, text=prompts, padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def mixed_inputs(next_processor: LlavaNextProcessor, next_images: dict) -> dict:
    """Two images of different aspect ratios in one prompt, a text-only prompt, and a third size alone."""
    prompts = [
        "USER: <image> and <image> compare ASSISTANT:",
        "USER: what is in the image ? ASSISTANT:",
        "USER: <image> describe this picture ASSISTANT:",
    ]
    images = [next_images["wide"], next_images["tall"], next_images["large"]]
    return processed(next_processor, images, prompts)


@pytest.mark.parametrize(
    ("scope", "newlines", "position_policy"),
    [(scope, newlines, policy) for (scope, newlines), policy in zip(COMBINATIONS, ["compact", "original"] * 2)],
)
def test_mixed_batch_matches_masked_stock_model(
    scope: str, newlines: str, position_policy: str, next_checkpoint, next_stock, mixed_inputs: dict
) -> None:
    """Both budget scopes and newline policies, both position policies: equal to the masked stock model."""
    pruned = load_pruned(
        next_checkpoint,
        energy_ratio=0.95,
        min_tokens=8,
        budget_scope=scope,
        newline_policy=newlines,
        position_policy=position_policy,
    )
    output = assert_matches_oracle(pruned, next_stock, mixed_inputs)
    assert len(set(output.token_budgets.tolist())) > 1
    assert all(len(kept) < total for kept, total in zip(output.kept_indices, output.tokens_per_image))


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_match_masked_stock_model(
    seed: int, next_checkpoint, next_processor: LlavaNextProcessor, next_stock, next_images: dict
) -> None:
    """Batch 1-3, 0-2 images per prompt of random sizes, random settings (scope, newlines, positions, selector,
    spectrum source, energy or fixed budgets): equal to the masked stock model."""
    rng = random.Random(seed)
    pruned = load_pruned(
        next_checkpoint,
        energy_ratio=rng.uniform(0.6, 0.99),
        min_tokens=rng.randint(1, 8),
        budget_scope=rng.choice(["image", "crop"]),
        newline_policy=rng.choice(["keep_rows", "drop"]),
        position_policy=rng.choice(["compact", "original"]),
        selector=rng.choice(["cls_attention", "uniform"]),
        spectrum_source=rng.choice(["vision", "projected"]),
        budget_mode=rng.choice(["energy", "energy", "fixed"]),
        fixed_tokens=rng.randint(1, 40),
    )
    prompts, counts = random_prompts(rng, batch=rng.randint(1, 3))
    images = [rng.choice(list(next_images.values())) for _ in range(sum(counts))]
    output = assert_matches_oracle(pruned, next_stock, processed(next_processor, images, prompts))
    assert output.token_budgets.shape == (sum(counts),)


def test_batch_equals_each_sample_alone(next_checkpoint, next_processor: LlavaNextProcessor, next_images: dict) -> None:
    """Budgets, kept positions and greedy tokens of each sample are the same in a mixed batch and alone."""
    pruned = load_pruned(next_checkpoint, energy_ratio=0.95, min_tokens=4, budget_scope="crop")
    prompts = ["USER: <image> describe ASSISTANT:", "USER: a dog ? ASSISTANT:", "USER: <image> <image> compare ASSISTANT:"]
    images = [next_images["panorama"], next_images["square"], next_images["large"]]
    batch = processed(next_processor, images, prompts)
    greedy = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        batch_features = image_features(pruned, batch)
        batch_tokens = pruned.generate(**batch, **greedy)[:, batch["input_ids"].shape[1] :]
    image_groups = [[0], [], [1, 2]]
    for row, (prompt, group) in enumerate(zip(prompts, image_groups)):
        alone = processed(next_processor, [images[index] for index in group], [prompt])
        with torch.no_grad():
            tokens = pruned.generate(**alone, **greedy)[:, alone["input_ids"].shape[1] :]
            if group:
                features = image_features(pruned, alone)
                assert features.token_budgets.tolist() == batch_features.token_budgets[group].tolist()
                for mine, theirs in zip(features.kept_indices, [batch_features.kept_indices[i] for i in group]):
                    assert torch.equal(mine, theirs)
        assert torch.equal(tokens[0], batch_tokens[row])


def vision_token_features(stock: LlavaNextForConditionalGeneration, inputs: dict, model) -> list[torch.Tensor]:
    """Per image, the tower's layer -2 patch features of its visual tokens in packed order (newlines excluded)."""
    with torch.no_grad():
        output = stock.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    patches = output.hidden_states[-2][:, 1:]
    per_image, start = [], 0
    for size in inputs["image_sizes"]:
        layout = model.model.packed_layout(size)
        crops = 1 + layout.grid_shape[0] * layout.grid_shape[1]
        tokens = layout.token_positions
        per_image.append(patches[start : start + crops][layout.crop[tokens], layout.patch[tokens]])
        start += crops
    return per_image


def reference_budget(features: torch.Tensor, ratio: float) -> tuple[int, float]:
    """Float64 budget of one centred (N, d) matrix, and the distance of `ratio` to the nearest curve point."""
    matrix = features.double().numpy()
    energies = np.linalg.svd(matrix - matrix.mean(0), compute_uv=False) ** 2
    curve = np.cumsum(energies) / energies.sum()
    return int((curve < ratio).sum()) + 1, float(np.abs(curve - ratio).min())


@pytest.mark.parametrize("scope", ["image", "crop"])
def test_budgets_follow_the_float64_spectrum(scope: str, next_checkpoint, next_stock, mixed_inputs: dict) -> None:
    """Image scope: one float64 SVD over base crop and grid; crop scope: one per crop, budgets summed per image."""
    ratio = 0.83
    pruned = load_pruned(next_checkpoint, energy_ratio=ratio, min_tokens=1, budget_scope=scope)
    per_image = vision_token_features(next_stock, mixed_inputs, pruned)
    expected = []
    for features, size in zip(per_image, mixed_inputs["image_sizes"]):
        layout = pruned.model.packed_layout(size)
        crops = layout.crop[layout.token_positions]
        units = [features] if scope == "image" else [features[crops == crop] for crop in crops.unique()]
        budgets = [reference_budget(unit, ratio) for unit in units]
        assert min(margin for _, margin in budgets) > 1e-5
        expected.append(sum(budget for budget, _ in budgets))
    with torch.no_grad():
        assert image_features(pruned, mixed_inputs).token_budgets.tolist() == expected


@pytest.mark.parametrize("scope", ["image", "crop"])
def test_energy_curves_give_the_budgets_the_model_uses(scope: str, next_checkpoint, mixed_inputs: dict) -> None:
    """`image_energy_curves` (what calibration uses): one curve per image or per crop, giving the model's budgets."""
    curves = load_pruned(next_checkpoint, budget_scope=scope).model.image_energy_curves(
        mixed_inputs["pixel_values"], mixed_inputs["image_sizes"]
    )
    expected_units = [1, 1, 1] if scope == "image" else [3, 3, 5]
    assert [len(units) for units in curves] == expected_units
    for ratio in (0.5, 0.9):
        model = load_pruned(next_checkpoint, budget_scope=scope, energy_ratio=ratio, min_tokens=3)
        with torch.no_grad():
            budgets = image_features(model, mixed_inputs).token_budgets.tolist()
        from_curves = [
            sum(int(budgets_from_curves(curve.unsqueeze(0), ratio, min_tokens=3)) for curve in units) for units in curves
        ]
        assert budgets == from_curves


@pytest.mark.parametrize(("scope", "newlines"), COMBINATIONS)
def test_kept_newlines_follow_the_policy(scope: str, newlines: str, next_checkpoint, mixed_inputs: dict) -> None:
    """keep_rows: exactly the newlines of grid rows that keep a token; drop: none. Budgets count visual tokens."""
    pruned = load_pruned(next_checkpoint, energy_ratio=0.9, min_tokens=4, budget_scope=scope, newline_policy=newlines)
    with torch.no_grad():
        output = image_features(pruned, mixed_inputs)
    kept_newlines = 0
    for kept, budget, size, features, total, visual in zip(
        output.kept_indices,
        output.token_budgets,
        mixed_inputs["image_sizes"],
        output.pooler_output,
        output.tokens_per_image,
        output.visual_tokens_per_image,
    ):
        layout = pruned.model.packed_layout(size)
        newline = layout.is_newline[kept]
        assert int((~newline).sum()) == int(budget)
        assert (len(layout), int((~layout.is_newline).sum())) == (total, visual)
        kept_rows = set(layout.row[kept[~newline]].tolist()) - {-1}
        expected = kept_rows if newlines == "keep_rows" else set()
        assert set(layout.row[kept[newline]].tolist()) == expected
        newline_features = features[newline.nonzero().squeeze(-1)]
        assert torch.equal(newline_features, pruned.model.image_newline.expand_as(newline_features))
        kept_newlines += len(newline_features)
    assert (kept_newlines > 0) == (newlines == "keep_rows")


def test_disabled_pruning_equals_the_stock_model(next_checkpoint, next_stock, mixed_inputs: dict) -> None:
    """enabled=False: the stock packed features and exactly the stock logits."""
    disabled = load_pruned(next_checkpoint, enabled=False)
    with torch.no_grad():
        ours, stock = image_features(disabled, mixed_inputs), image_features(next_stock, mixed_inputs)
        assert max_abs_diff(ours.pooler_output, stock.pooler_output) == 0
        assert torch.equal(disabled(**mixed_inputs).logits, next_stock(**mixed_inputs).logits)


def test_prefill_is_shortened_and_cache_holds_the_pruned_length(next_checkpoint, mixed_inputs: dict) -> None:
    """The language model runs on the compacted batch: its cache length is the longest kept row."""
    pruned = load_pruned(next_checkpoint, energy_ratio=0.8, min_tokens=4)
    with torch.no_grad():
        output = pruned(**mixed_inputs, use_cache=True)
    kept_per_row = output.pruned_attention_mask.sum(-1)
    assert output_cache(output).get_seq_length() == output.logits.shape[1] == int(kept_per_row.max())
    assert output.logits.shape[1] < mixed_inputs["input_ids"].shape[1] // 4


def test_beam_search_and_several_returned_sequences_match_the_oracle(
    next_checkpoint, next_stock, mixed_inputs: dict
) -> None:
    """Beams repeat each row's images of different packed lengths: same sequences as the masked stock model."""
    pruned = load_pruned(next_checkpoint, energy_ratio=0.9, min_tokens=4, budget_scope="crop")
    with torch.no_grad():
        reference_inputs = oracle_inputs(
            mixed_inputs, image_features(pruned, mixed_inputs), pruned.config.image_token_id, "compact"
        )
        options = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
        assert torch.equal(pruned.generate(**mixed_inputs, **options), next_stock.generate(**reference_inputs, **options))


def test_loads_the_stock_checkpoint_with_every_weight(next_checkpoint, next_stock) -> None:
    """A stock llava-hf LLaVA-NeXT checkpoint (transformers-4 names, image_newline included) loads completely."""
    model, info = AdaPruneLlavaNextForConditionalGeneration.from_pretrained(
        next_checkpoint, output_loading_info=True, budget_scope="crop"
    )
    assert {key: value for key, value in info.items() if len(value)} == {}
    assert isinstance(model.config, AdaPruneLlavaNextConfig) and model.config.model_type == "llava_next_adaprune"
    assert model.config.pruning.budget_scope == "crop"
    loaded, stock = model.state_dict(), next_stock.state_dict()
    assert sorted(loaded) == sorted(stock)
    assert [name for name in stock if not torch.equal(loaded[name], stock[name])] == []


def test_missing_image_sizes_is_a_clear_error(next_checkpoint, mixed_inputs: dict) -> None:
    pruned = load_pruned(next_checkpoint)
    with pytest.raises(ValueError, match=r"LLaVA-NeXT image features need image_sizes"):
        pruned.get_image_features(pixel_values=mixed_inputs["pixel_values"], image_sizes=None)
    inputs = {key: value for key, value in mixed_inputs.items() if key != "image_sizes"}
    with pytest.raises(ValueError, match=r"LLaVA-NeXT image features need image_sizes"):
        pruned.generate(**inputs, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"LLaVA-NeXT image features need image_sizes"):
        pruned.model.image_energy_curves(mixed_inputs["pixel_values"])


def test_wrong_placeholder_count_is_a_clear_error(next_checkpoint, next_processor, next_images: dict) -> None:
    pruned = load_pruned(next_checkpoint)
    inputs = processed(next_processor, [next_images["wide"]], ["USER: <image> describe ASSISTANT:"])
    inputs["input_ids"] = inputs["input_ids"][:, 10:]
    inputs["attention_mask"] = inputs["attention_mask"][:, 10:]
    with pytest.raises(ValueError, match=r"image placeholder tokens, but its 1 images need 1752"):
        pruned(**inputs)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"budget_scope": "tile"}, r"budget_scope must be one of \['image', 'crop'\], got 'tile'"),
        ({"newline_policy": "keep"}, r"newline_policy must be one of \['keep_rows', 'drop'\], got 'keep'"),
    ],
)
def test_bad_any_resolution_settings(setting: dict, message: str, next_checkpoint) -> None:
    with pytest.raises(ValueError, match=message):
        load_pruned(next_checkpoint, **setting)


def test_static_cache_is_refused(next_checkpoint, mixed_inputs: dict) -> None:
    pruned = load_pruned(next_checkpoint)
    with pytest.raises(ValueError, match="static caches need fixed shapes"):
        pruned.generate(**mixed_inputs, max_new_tokens=2, cache_implementation="static")


def test_continuing_a_cache_with_new_images_is_refused(next_checkpoint, mixed_inputs: dict) -> None:
    pruned = load_pruned(next_checkpoint)
    cache = DynamicCache(config=pruned.config.text_config)
    with torch.no_grad():
        pruned(input_ids=mixed_inputs["input_ids"][:, :3], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="the cache already holds 3 tokens"):
            pruned(**mixed_inputs, past_key_values=cache)


@pytest.mark.parametrize("source", ["vision", "projected"])
def test_non_finite_features_name_the_image(source: str, next_checkpoint, mixed_inputs: dict) -> None:
    """NaN pixels in the second image (of three) raise, naming it, whichever features set the budgets."""
    pruned = load_pruned(next_checkpoint, spectrum_source=source, budget_scope="crop")
    broken = mixed_inputs["pixel_values"].clone()
    broken[1] = float("nan")
    with pytest.raises(ValueError, match=r"images \[1\] \(0-based, in batch order\) have non-finite visual features"):
        pruned.get_image_features(pixel_values=broken, image_sizes=mixed_inputs["image_sizes"])


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
def test_continuing_from_a_pruned_cache_matches_the_oracle_over_turns(
    next_checkpoint, next_stock, next_processor, mixed_inputs: dict, cache_name: str
) -> None:
    """Multi-turn chat on a mixed batch (two images in a prompt, a text-only prompt) reuses the pruned cache."""
    pruned = load_pruned(next_checkpoint, energy_ratio=0.8, min_tokens=4, position_policy="original")
    turn = next_processor.tokenizer(["USER: and the sky ? ASSISTANT:"], add_special_tokens=False)["input_ids"][0]
    assert_turns_match_oracle(pruned, next_stock, mixed_inputs, turn, cache_name)
