"""generate() and forward() as callers use them: batching, decoding modes, cache, loss, pass-through cases."""

from __future__ import annotations

import pytest
import torch
from support.oracle import assert_turns_match_oracle, dropped_placeholders, load_pruned, max_abs_diff, oracle_inputs
from transformers import LlavaProcessor

from adaprune.compat import cache_argument, output_cache

PROMPTS = [
    "USER: <image> describe this picture ASSISTANT:",
    "USER: what is in the image <image> ? ASSISTANT:",
    "USER: <image> and <image> compare two images ASSISTANT:",
    "USER: a dog ASSISTANT:",
]
IMAGE_NAMES = [["busy"], ["plain"], ["shapes", "gradient"], []]


def batch_inputs(processor: LlavaProcessor, images: dict, rows: list[int]) -> dict:
    """Processor inputs for the chosen rows of PROMPTS (left padded)."""
    row_images = [images[name] for row in rows for name in IMAGE_NAMES[row]]
    return processor(images=row_images or None, text=[PROMPTS[row] for row in rows], padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def pruned(small_checkpoint):
    return load_pruned(small_checkpoint, energy_ratio=0.9, min_tokens=2)


def new_tokens(sequences: torch.Tensor, inputs: dict) -> torch.Tensor:
    return sequences[:, inputs["input_ids"].shape[1] :]


def test_batch_equals_each_sample_alone(pruned, small_processor, small_images) -> None:
    """Tokens, budgets and logits of a padded batch equal those of every sample run alone."""
    rows = [0, 1, 2, 3]
    batch = batch_inputs(small_processor, small_images, rows)
    settings = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        together = pruned.generate(**batch, **settings)
        budgets = pruned.get_image_features(pixel_values=batch["pixel_values"]).token_budgets.tolist()
        alone_budgets = []
        for position, row in enumerate(rows):
            single = batch_inputs(small_processor, small_images, [row])
            alone = pruned.generate(**single, **settings)
            assert torch.equal(new_tokens(alone.sequences, single)[0], new_tokens(together.sequences, batch)[position])
            assert max_abs_diff([s[0] for s in alone.logits], [s[position] for s in together.logits]) <= 1e-4
            if "pixel_values" in single:
                alone_budgets += pruned.get_image_features(pixel_values=single["pixel_values"]).token_budgets.tolist()
    assert budgets == alone_budgets
    assert len(set(budgets)) > 1


def test_prefill_cache_holds_the_pruned_length(pruned, small_processor, small_images) -> None:
    """The KV cache after prefill holds the compacted length, not the 64-tokens-per-image one."""
    inputs = batch_inputs(small_processor, small_images, [0, 2])
    with torch.no_grad():
        image_output = pruned.get_image_features(pixel_values=inputs["pixel_values"])
        output = pruned(**inputs, use_cache=True)
        generated = pruned.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    dropped = dropped_placeholders(
        inputs["input_ids"], pruned.config.image_token_id, image_output.kept_indices, image_output.tokens_per_image
    )
    kept_per_row = (inputs["attention_mask"].bool() & ~dropped).sum(-1)
    assert output_cache(output).get_seq_length() == int(kept_per_row.max())
    assert output_cache(output).get_seq_length() < inputs["input_ids"].shape[1]
    assert output.logits.shape[1] == int(kept_per_row.max())
    assert output_cache(generated).get_seq_length() == int(kept_per_row.max()) + 4 - 1


def test_loss_equals_stock_loss_on_the_shortened_sequence(pruned, small_stock, small_processor, small_images) -> None:
    """forward(labels=...) prunes like generate and gives the stock model's loss on the shortened sequence."""
    inputs = batch_inputs(small_processor, small_images, [0, 2])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == pruned.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        image_output = pruned.get_image_features(pixel_values=inputs["pixel_values"])
        ours = pruned(**inputs, labels=labels)
    dropped = dropped_placeholders(
        inputs["input_ids"], pruned.config.image_token_id, image_output.kept_indices, image_output.tokens_per_image
    )
    keep = inputs["attention_mask"].bool() & ~dropped
    rows = [inputs["input_ids"][row][keep[row]] for row in range(keep.shape[0])]
    row_labels = [labels[row][keep[row]] for row in range(keep.shape[0])]
    width = max(len(row) for row in rows)
    pad = small_stock.config.text_config.pad_token_id
    short_ids = torch.stack([torch.cat([row.new_full((width - len(row),), pad), row]) for row in rows])
    short_labels = torch.stack([torch.cat([row.new_full((width - len(row),), -100), row]) for row in row_labels])
    short_mask = torch.stack([torch.arange(width) >= width - len(row) for row in rows]).long()
    features = {"image": type(image_output)(pooler_output=image_output.pooler_output)}
    with torch.no_grad():
        reference = small_stock(
            input_ids=short_ids,
            attention_mask=short_mask,
            position_ids=(short_mask.cumsum(-1) - 1).clamp_min(0),
            mm_encoder_outputs=features,
            labels=short_labels,
        )
    assert ours.loss is not None
    assert abs(float(ours.loss) - float(reference.loss)) <= 1e-5
    assert torch.equal(ours.pruned_attention_mask, short_mask)


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=3, do_sample=False),
        dict(num_beams=2, num_return_sequences=2, do_sample=False),
        dict(do_sample=True, top_k=5, num_return_sequences=2),
        dict(do_sample=False, use_cache=False),
    ],
    ids=["beam-search", "beams-with-return-sequences", "sampling", "no-cache"],
)
def test_decoding_modes_match_the_oracle_with_two_images(
    settings: dict, pruned, small_stock, small_processor, small_images
) -> None:
    """Beam search, num_return_sequences, sampling and use_cache=False on prompts with one and two images."""
    inputs = batch_inputs(small_processor, small_images, [2, 0])
    with torch.no_grad():
        image_output = pruned.get_image_features(pixel_values=inputs["pixel_values"])
        reference_inputs = oracle_inputs(inputs, image_output, pruned.config.image_token_id, "compact")
        torch.manual_seed(7)
        ours = pruned.generate(**inputs, max_new_tokens=5, **settings)
        torch.manual_seed(7)
        reference = small_stock.generate(**reference_inputs, max_new_tokens=5, **settings)
    assert torch.equal(ours, reference)
    expected_rows = 2 * settings.get("num_return_sequences", 1)
    assert ours.shape[0] == expected_rows
    assert torch.equal(
        ours[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].repeat_interleave(expected_rows // 2, 0)
    )


def test_no_cache_equals_cached_generation(pruned, small_processor, small_images) -> None:
    inputs = batch_inputs(small_processor, small_images, [0, 1, 2])
    with torch.no_grad():
        cached = pruned.generate(**inputs, max_new_tokens=5, do_sample=False)
        uncached = pruned.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_text_only_prompts_equal_the_stock_model(pruned, small_stock, small_processor) -> None:
    inputs = small_processor(
        text=["USER: a dog ASSISTANT:", "USER: red sky ? ASSISTANT:"], padding=True, return_tensors="pt"
    )
    settings = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours, reference = pruned.generate(**inputs, **settings), small_stock.generate(**inputs, **settings)
        forward, reference_forward = pruned(**inputs), small_stock(**inputs)
    assert torch.equal(ours.sequences, reference.sequences)
    assert max_abs_diff(ours.logits, reference.logits) == 0
    assert torch.equal(forward.logits, reference_forward.logits)


def test_disabled_pruning_equals_the_stock_model(small_checkpoint, small_stock, small_processor, small_images) -> None:
    disabled = load_pruned(small_checkpoint, enabled=False)
    inputs = batch_inputs(small_processor, small_images, [0, 2, 3])
    settings = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours, reference = disabled.generate(**inputs, **settings), small_stock.generate(**inputs, **settings)
        features = disabled.get_image_features(pixel_values=inputs["pixel_values"])
        forward, reference_forward = disabled(**inputs), small_stock(**inputs)
    assert torch.equal(ours.sequences, reference.sequences)
    assert max_abs_diff(ours.logits, reference.logits) == 0
    assert torch.equal(forward.logits, reference_forward.logits)
    assert [len(f) for f in features.pooler_output] == [64, 64, 64]


def test_fixed_budget_keeps_the_same_count_for_every_image(small_checkpoint, small_processor, small_images) -> None:
    fixed = load_pruned(small_checkpoint, budget_mode="fixed", fixed_tokens=12)
    inputs = batch_inputs(small_processor, small_images, [0, 1, 2])
    with torch.no_grad():
        image_output = fixed.get_image_features(pixel_values=inputs["pixel_values"])
    assert image_output.token_budgets.tolist() == [12, 12, 12, 12]
    assert [len(kept) for kept in image_output.kept_indices] == [12, 12, 12, 12]


def test_kept_indices_are_ascending_and_match_the_kept_features(pruned, small_processor, small_images) -> None:
    """`pooler_output` rows are the stock projected features at `kept_indices`."""
    inputs = batch_inputs(small_processor, small_images, [2])
    disabled_view = load_pruned(pruned.name_or_path, enabled=False)
    with torch.no_grad():
        image_output = pruned.get_image_features(pixel_values=inputs["pixel_values"])
        full = disabled_view.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    for kept, features, all_features, budget in zip(
        image_output.kept_indices, image_output.pooler_output, full, image_output.token_budgets, strict=True
    ):
        assert len(kept) == int(budget)
        assert torch.all(kept[1:] > kept[:-1])
        assert torch.equal(features, all_features[kept])


def test_outputs_keep_the_stock_field_order(pruned, small_processor, small_images) -> None:
    """Index 0 and tuple outputs are the logits, as with the stock model; the pruning fields come last."""
    inputs = batch_inputs(small_processor, small_images, [0])
    with torch.no_grad():
        output = pruned(**inputs)
        as_tuple = pruned(**inputs, return_dict=False)
    assert torch.equal(output[0], output.logits)
    assert torch.equal(as_tuple[0], output.logits)
    assert list(output.keys())[-4:] == ["pruned_position_ids", "source_index", "token_budgets", "kept_indices_by_layer"]


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
@pytest.mark.parametrize("policy", ["compact", "original"])
def test_continuing_from_a_pruned_cache_matches_the_oracle_over_turns(
    policy: str, cache_name: str, small_checkpoint, small_stock, small_processor, small_images
) -> None:
    """Multi-turn chat reuses the pruned cache (under either cache name), as with the stock model."""
    pruned = load_pruned(small_checkpoint, energy_ratio=0.9, min_tokens=2, position_policy=policy)
    turn = small_processor.tokenizer(["USER: and the sky ? ASSISTANT:"], add_special_tokens=False)["input_ids"][0]
    assert_turns_match_oracle(
        pruned, small_stock, batch_inputs(small_processor, small_images, [2, 0]), turn, cache_name
    )


@pytest.mark.parametrize(("rows", "implicit"), [([0, 2], False), ([0], True)], ids=["padded-batch", "implicit"])
@pytest.mark.parametrize("policy", ["compact", "original"])
def test_forward_steps_on_a_pruned_cache_take_the_callers_full_mask(
    policy: str, rows: list[int], implicit: bool, small_checkpoint, small_stock, small_processor, small_images
) -> None:
    """A hand-written decoding loop: after a pruned prefill, forward() takes the mask and positions of the caller's
    full sequence, and equals the masked stock model step by step. Without padding both may be left out
    (`implicit`): the mask is then all ones and the positions continue after the sequence, as for the stock model."""
    pruned = load_pruned(small_checkpoint, energy_ratio=0.9, min_tokens=2, position_policy=policy)
    inputs = batch_inputs(small_processor, small_images, rows)
    with torch.no_grad():
        image_output = pruned.get_image_features(pixel_values=inputs["pixel_values"])
        reference_inputs = oracle_inputs(inputs, image_output, pruned.config.image_token_id, policy)
        ours = pruned(**inputs, use_cache=True)
        reference = small_stock(**reference_inputs, use_cache=True)
        mask, reference_mask = inputs["attention_mask"], reference_inputs["attention_mask"]
        positions = inputs["attention_mask"].sum(-1, keepdim=True) - 1
        reference_positions = reference_inputs["position_ids"][:, -1:]
        for _ in range(3):
            token = reference.logits[:, -1:].argmax(-1)
            assert torch.equal(ours.logits[:, -1:].argmax(-1), token)
            assert max_abs_diff([ours.logits[:, -1]], [reference.logits[:, -1]]) <= 1e-4
            mask, reference_mask = (torch.cat([m, torch.ones_like(token)], dim=1) for m in (mask, reference_mask))
            positions, reference_positions = positions + 1, reference_positions + 1
            ours = pruned(
                input_ids=token,
                attention_mask=None if implicit else mask,
                position_ids=None if implicit else positions,
                use_cache=True,
                **cache_argument(output_cache(ours)),
            )
            reference = small_stock(
                input_ids=token,
                attention_mask=reference_mask,
                position_ids=reference_positions,
                use_cache=True,
                **cache_argument(output_cache(reference)),
            )
        assert max_abs_diff([ours.logits[:, -1]], [reference.logits[:, -1]]) <= 1e-4


def test_beam_search_from_inputs_embeds_matches_the_oracle(pruned, small_stock, small_processor, small_images) -> None:
    """generate(inputs_embeds=..., num_beams>1) without input_ids finds the images' placeholders in the embeddings."""
    inputs = batch_inputs(small_processor, small_images, [2, 0])
    settings = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    with torch.no_grad():
        image_output = pruned.get_image_features(pixel_values=inputs["pixel_values"])
        reference_inputs = oracle_inputs(inputs, image_output, pruned.config.image_token_id, "compact")
        embeds = pruned.get_input_embeddings()(inputs["input_ids"])
        ours = pruned.generate(
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            **settings,
        )
        reference = small_stock.generate(
            inputs_embeds=embeds, **{k: v for k, v in reference_inputs.items() if k != "input_ids"}, **settings
        )
    assert torch.equal(ours, reference)


def test_max_length_counts_the_whole_conversation_when_continuing(pruned, small_processor, small_images) -> None:
    """max_length means the length of the whole sequence, as for the stock model, though only its uncached part
    is fed to the model."""
    inputs = batch_inputs(small_processor, small_images, [0])
    with torch.no_grad():
        first = pruned.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        sequence = torch.cat([first.sequences, first.sequences[:, -2:]], dim=1)
        continued = pruned.generate(input_ids=sequence, cache=output_cache(first), max_length=sequence.shape[1] + 4)
    assert continued.shape[1] == sequence.shape[1] + 4
