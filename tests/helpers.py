"""Helpers shared by the tests."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import torch

from adaprune import AdaPruneLlavaForConditionalGeneration


def load_pruned(checkpoint: Path, **settings) -> AdaPruneLlavaForConditionalGeneration:
    """The pruning model on a stock checkpoint, with the given pruning settings."""
    return AdaPruneLlavaForConditionalGeneration.from_pretrained(checkpoint, **settings).eval()


WORDS = "what is in the image ? describe this picture a dog cat red sky city street many few".split()


def random_prompts(rng: random.Random, batch: int, max_images: int = 2) -> tuple[list[str], list[int]]:
    """Prompts of random length with 0..max_images <image> markers each (at least one image in the batch)."""
    while True:
        counts = [rng.randint(0, max_images) for _ in range(batch)]
        if sum(counts):
            break
    prompts = []
    for count in counts:
        words = ["USER:"] + [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
        for _ in range(count):
            words.insert(rng.randint(1, len(words)), "<image>")
        prompts.append(" ".join(words + ["ASSISTANT:"]))
    return prompts, counts


def dropped_placeholders(
    input_ids: torch.Tensor, image_token_id: int, kept_indices: list[torch.Tensor], tokens_per_image: list[int]
) -> torch.Tensor:
    """(B, L) mask of the image placeholders whose token was dropped, by walking placeholders in row-major order."""
    positions = [(row, col) for row, col in (input_ids == image_token_id).nonzero().tolist()]
    assert len(positions) == sum(tokens_per_image)
    dropped = torch.zeros_like(input_ids, dtype=torch.bool)
    start = 0
    for kept, count in zip(kept_indices, tokens_per_image):
        kept_set = set(kept.tolist())
        for token in range(count):
            if token not in kept_set:
                dropped[positions[start + token]] = True
        start += count
    return dropped


def oracle_inputs(inputs: dict, image_output, image_token_id: int, position_policy: str) -> dict:
    """The stock model's inputs for the oracle: full sequence, attention mask zeroed at dropped image tokens.

    Positions: "compact" is what stock `generate()` derives from that mask; "original" passes the positions of the
    unmasked sequence explicitly.
    """
    dropped = dropped_placeholders(
        inputs["input_ids"], image_token_id, image_output.kept_indices, image_output.tokens_per_image
    )
    mask = inputs["attention_mask"].masked_fill(dropped, 0)
    source_mask = mask if position_policy == "compact" else inputs["attention_mask"]
    positions = (source_mask.cumsum(-1) - 1).clamp_min(0)
    return {**inputs, "attention_mask": mask, "position_ids": positions}


def max_abs_diff(first: Iterable[torch.Tensor], second: Iterable[torch.Tensor]) -> float:
    """Largest absolute difference over paired tensors."""
    return max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True))
