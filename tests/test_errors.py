"""Bad input gets a clear error that names the values involved, never a silent wrong answer."""

from __future__ import annotations

import re

import pytest
import torch
from support.oracle import load_pruned
from transformers import DynamicCache, LlavaProcessor, SiglipVisionConfig, StaticCache

from adaprune import AdaPruneConfig, AdaPruneLlavaForConditionalGeneration
from adaprune.compat import output_cache
from adaprune.methods import SELECTORS
from adaprune.tools.tiny_llava import build_config


@pytest.fixture(scope="module")
def pruned(small_checkpoint):
    return load_pruned(small_checkpoint, energy_ratio=0.9, min_tokens=2)


@pytest.fixture(scope="module")
def one_image(small_processor: LlavaProcessor, small_images: dict) -> dict:
    return small_processor(
        images=[small_images["busy"]], text=["USER: <image> describe ASSISTANT:"], return_tensors="pt"
    )


def test_image_without_placeholders(pruned, small_processor, small_images) -> None:
    pixel_values = small_processor.image_processor([small_images["busy"]], return_tensors="pt")["pixel_values"]
    text = small_processor.tokenizer(["USER: describe ASSISTANT:"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"0 image placeholder tokens.*1 images need 64"):
        pruned.generate(**text, pixel_values=pixel_values, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"0 image placeholder tokens.*1 images need 64"):
        pruned(**text, pixel_values=pixel_values)


def test_wrong_number_of_placeholders_names_both_counts(pruned, one_image: dict) -> None:
    image_positions = (one_image["input_ids"][0] == pruned.config.image_token_id).nonzero().squeeze(-1)
    keep = torch.ones(one_image["input_ids"].shape[1], dtype=torch.bool)
    keep[image_positions[-1]] = False
    short = {key: one_image[key][:, keep] for key in ("input_ids", "attention_mask")}
    with pytest.raises(ValueError, match=r"63 image placeholder tokens.*need 64 \(\[64\] per image\)"):
        pruned(**short, pixel_values=one_image["pixel_values"])
    with pytest.raises(ValueError, match=r"63 image placeholder tokens"):
        pruned.generate(**short, pixel_values=one_image["pixel_values"], max_new_tokens=2)


def test_placeholders_split_across_rows_not_by_whole_images(pruned, small_processor, small_images) -> None:
    """With beams, rows are matched to images; a row holding part of an image is refused."""
    inputs = small_processor(
        images=[small_images["busy"], small_images["plain"]],
        text=["USER: <image> a ASSISTANT:", "USER: <image> b ASSISTANT:"],
        padding=True,
        return_tensors="pt",
    )
    ids = inputs["input_ids"].clone()
    image_positions = (ids[0] == pruned.config.image_token_id).nonzero().squeeze(-1)
    ids[0, image_positions[:10]] = small_processor.tokenizer.convert_tokens_to_ids("dog")
    ids[1, :10] = pruned.config.image_token_id
    with pytest.raises(ValueError, match=r"row 0 has 54 image placeholder tokens"):
        pruned.generate(**{**inputs, "input_ids": ids}, num_beams=2, max_new_tokens=2)


def test_non_finite_features_name_the_image(pruned, small_processor, small_images) -> None:
    pixel_values = small_processor.image_processor([small_images["busy"], small_images["plain"]], return_tensors="pt")[
        "pixel_values"
    ]
    pixel_values[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"images \[1\].*non-finite"):
        pruned.get_image_features(pixel_values=pixel_values)


def test_cls_attention_needs_a_cls_token(small_processor) -> None:
    config = build_config(small_processor)
    siglip = SiglipVisionConfig(
        image_size=112, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    settings = dict(config.to_dict(), vision_config=siglip, vision_feature_select_strategy="full")
    model = AdaPruneLlavaForConditionalGeneration(AdaPruneConfig(**settings)).eval()
    pixel_values = torch.zeros(1, 3, 112, 112)
    with pytest.raises(ValueError, match=r"'cls_attention' needs a vision tower with a \[CLS\] token.*'uniform'"):
        model.get_image_features(pixel_values=pixel_values)
    model.config.selector = "uniform"
    assert len(model.get_image_features(pixel_values=pixel_values).kept_indices) == 1


def test_cls_attention_needs_an_attention_layer_before_the_feature_layer(pruned, one_image: dict) -> None:
    with pytest.raises(ValueError, match=r"vision_feature_layer=0.*embedding output"):
        pruned.get_image_features(pixel_values=one_image["pixel_values"], vision_feature_layer=0)


def test_static_cache_is_refused(pruned, one_image: dict) -> None:
    with pytest.raises(ValueError, match=r"StaticCache.*dynamic cache"):
        pruned.generate(**one_image, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("option", [dict(prefill_chunk_size=16), dict(prompt_lookup_num_tokens=2)])
def test_options_that_need_the_full_prefill_are_refused(pruned, one_image: dict, option: dict) -> None:
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"{name}=.*cannot be combined with visual-token pruning"):
        pruned.generate(**one_image, max_new_tokens=2, **option)


def test_assisted_decoding_is_refused_in_one_line(pruned, one_image: dict) -> None:
    with pytest.raises(ValueError, match=r"assistant_model=<AdaPruneLlavaForConditionalGeneration> cannot") as error:
        pruned.generate(**one_image, max_new_tokens=2, assistant_model=pruned)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
def test_a_static_cache_is_refused_under_either_name(pruned, one_image: dict, cache_name: str) -> None:
    cache = StaticCache(config=pruned.config.text_config, max_cache_len=128)
    with pytest.raises(ValueError, match="StaticCache: pruning changes the prefill length"):
        pruned(**one_image, **{cache_name: cache})
    with pytest.raises(ValueError, match="StaticCache: pruning changes the prefill length"):
        pruned.generate(**one_image, max_new_tokens=2, **{cache_name: cache})


def test_a_cache_passed_under_both_names_is_refused(pruned, one_image: dict) -> None:
    with pytest.raises(ValueError, match="the cache was passed twice, as cache and past_key_values"):
        pruned(**one_image, cache=DynamicCache(), past_key_values=DynamicCache())


def test_masked_image_placeholders_are_refused(pruned, one_image: dict) -> None:
    """A mask hiding image tokens could leave a row with nothing but dropped placeholders (or fewer than
    min_tokens visible): refused, in forward and generate, instead of an empty row or a silent lower budget."""
    text = one_image["input_ids"] != pruned.config.image_token_id
    for mask in (one_image["attention_mask"].masked_fill(text, 0), one_image["attention_mask"].clone()):
        mask[0, (~text[0]).nonzero()[:5, 0]] = 0
        with pytest.raises(ValueError, match=r"attention_mask hides 5 image placeholder tokens \(rows \[0\]\)"):
            pruned(**{**one_image, "attention_mask": mask})
        with pytest.raises(ValueError, match=r"attention_mask hides 5 image placeholder tokens"):
            pruned.generate(**{**one_image, "attention_mask": mask}, max_new_tokens=2)


def test_continuing_a_pruned_cache_needs_the_full_sequence(pruned, one_image: dict) -> None:
    with torch.no_grad():
        first = pruned.generate(**one_image, max_new_tokens=3, return_dict_in_generate=True)
    cache = output_cache(first)
    covered = one_image["input_ids"].shape[1] + 2
    with pytest.raises(ValueError, match=rf"the cache already holds {covered} positions .* input_ids has {covered}"):
        pruned.generate(input_ids=first.sequences[:, :covered], cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="inputs_embeds cannot continue a cache filled by a pruned prefill"):
        pruned.generate(inputs_embeds=pruned.get_input_embeddings()(first.sequences), cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask covers the caller's full sequence: expected shape \(1, "):
        pruned(input_ids=first.sequences[:, -1:], attention_mask=torch.ones(1, 5, dtype=torch.long), cache=cache)


def test_continuing_a_cache_with_new_images_is_refused(pruned, one_image: dict) -> None:
    with torch.no_grad():
        cache = output_cache(pruned(**one_image, use_cache=True))
    with pytest.raises(ValueError, match=r"cache already holds \d+ tokens"):
        pruned(**one_image, past_key_values=cache)


def test_bad_setting_after_loading_is_caught_on_use(small_checkpoint, one_image: dict) -> None:
    model = load_pruned(small_checkpoint)
    model.config.energy_ratio = 1.5
    with pytest.raises(ValueError, match=r"energy_ratio must be a number in \(0, 1\], got 1.5"):
        model.get_image_features(pixel_values=one_image["pixel_values"])


def test_bad_setting_at_loading(small_checkpoint) -> None:
    with pytest.raises(ValueError, match=re.escape(f"selector must be one of {list(SELECTORS)}, got 'topk'")):
        load_pruned(small_checkpoint, selector="topk")


def test_continuing_a_pruned_cache_with_more_rows_than_it_holds_is_refused(pruned, one_image: dict) -> None:
    """Beams in a continued conversation would need the cache expanded per beam; stock generate() does not do
    that either, so the mismatch gets a clear error."""
    with torch.no_grad():
        first = pruned.generate(**one_image, max_new_tokens=3, return_dict_in_generate=True)
        sequence = torch.cat([first.sequences, first.sequences[:, -2:]], dim=1)
        with pytest.raises(ValueError, match="holds 1 sequences, and the inputs have 2; continue each cached"):
            pruned.generate(input_ids=sequence, cache=output_cache(first), max_new_tokens=2, num_beams=2)
