"""The shipped built-in model: a stock llava-hf checkpoint that answers the task's held-out questions, and whose
kept tokens `adaprune eval` reads correctly from generation."""

from __future__ import annotations

import json

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from adaprune.tools import synthetic_vqa
from adaprune.tools.builtin_llava import BUILTIN_GEOMETRY, builtin_checkpoint
from adaprune.tools.evaluation import Variant, kept_tokens, proportion, recorded_budgets, run_variant
from adaprune.tools.workflow import load_model

HELD_OUT = 400
# The issue asks for 95% exact match overall with all tokens; the shipped model answers all but one or two of these
# 400 questions (docs/ACCURACY.md). Each question type must reach the bar too, so that a model that gave up on one
# skill (as an earlier one did on left/right) cannot pass on the others.
MINIMUM_ACCURACY = 0.95


def test_the_shipped_checkpoint_is_a_small_stock_llava() -> None:
    directory = builtin_checkpoint()
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_feature_layer"] == -2
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["text_config"]["model_type"] == "llama"
    assert (directory / "model.safetensors").stat().st_size < 8 * 2**20
    model = LlavaForConditionalGeneration.from_pretrained(directory)
    processor = LlavaProcessor.from_pretrained(directory)
    assert model.config.image_seq_length == BUILTIN_GEOMETRY.tokens_per_image == synthetic_vqa.GRID**2
    assert (
        processor.tokenizer.unk_token_id not in processor.tokenizer(" ".join(synthetic_vqa.vocabulary()))["input_ids"]
    )
    training = json.loads((directory / "training.json").read_text())
    assert training["seconds"] < 45 * 60 and training["threads"] == 2


def test_the_shipped_model_answers_held_out_questions_with_all_tokens() -> None:
    loaded = load_model(str(builtin_checkpoint()), {})
    questions = list(synthetic_vqa.samples("test", HELD_OUT))
    run = run_variant(
        loaded.model, loaded.processor, Variant("all tokens", {"enabled": False}), questions, batch_size=50
    )
    assert set(run.kept_tokens) == {synthetic_vqa.GRID**2}
    by_type = {
        kind: proportion([ok for ok, item in zip(run.correct, questions) if item.question_type == kind]).value
        for kind in synthetic_vqa.QUESTION_TYPES
    }
    assert all(accuracy >= MINIMUM_ACCURACY for accuracy in by_type.values()), by_type
    assert proportion(run.correct).value >= MINIMUM_ACCURACY, by_type


def test_kept_tokens_recorded_during_generation_are_the_image_features_budgets() -> None:
    loaded = load_model(str(builtin_checkpoint()), {"energy_ratio": 0.8, "min_tokens": 2})
    questions = list(synthetic_vqa.samples("test", 6))
    inputs = loaded.processor(
        images=[item.image() for item in questions],
        text=[item.prompt for item in questions],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = loaded.model.model.get_image_features(pixel_values=inputs["pixel_values"]).token_budgets.tolist()
    for beams in (1, 2):
        with torch.no_grad(), recorded_budgets(loaded.model) as recorded:
            loaded.model.generate(**inputs, max_new_tokens=2, num_beams=beams, do_sample=False)
        assert kept_tokens(loaded.model, inputs, recorded) == expected
    assert len(set(expected)) > 1  # scenes of different density get different budgets


def test_the_cls_attention_selector_keeps_the_objects_of_sparse_scenes() -> None:
    """The kept-patch pictures show objects: with as many tokens as a sparse scene has objects (at most 3), the
    [CLS] attention picks the object cells in nearly every scene."""
    loaded = load_model(str(builtin_checkpoint()), {"budget_mode": "fixed", "fixed_tokens": 3})
    scenes = [item for item in synthetic_vqa.samples("test", 200) if item.density == "sparse"]
    pixel_values = loaded.processor.image_processor([item.image() for item in scenes], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        kept = loaded.model.model.get_image_features(pixel_values=pixel_values).kept_indices
    covered = [
        {obj.row * synthetic_vqa.GRID + obj.col for obj in item.objects} <= set(indices.tolist())
        for item, indices in zip(scenes, kept)
    ]
    assert sum(covered) >= 0.9 * len(scenes), f"{sum(covered)} of {len(scenes)} sparse scenes keep all their objects"
