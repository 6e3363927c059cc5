"""The training script's batches are what the model sees at inference: the processor's pixels, the prompt with k
image tokens, labels on the answer only, and the asked objects among the kept cells."""

from __future__ import annotations

import numpy as np
import torch

from adaprune.tools import synthetic_vqa
from adaprune.tools.builtin_llava import build_builtin_processor
from adaprune.tools.train_builtin import Batches, kept_cells


def test_training_pixels_are_the_processors() -> None:
    processor = build_builtin_processor()
    items = list(synthetic_vqa.samples("train", 3))
    expected = processor.image_processor([item.image() for item in items], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(Batches(processor, 3, 10, 0).pixel_values(items), expected, atol=1e-5, rtol=0)


def test_token_batches_hold_k_image_tokens_and_label_only_the_answer() -> None:
    processor = build_builtin_processor()
    items = list(synthetic_vqa.samples("train", 4))
    batch = Batches(processor, 4, 10, 0).token_batch(items, 7)
    tokenizer = processor.tokenizer
    for row, item in enumerate(items):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert int((ids == processor.image_token_id).sum()) == 7
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == [tokenizer.convert_tokens_to_ids(item.answer), tokenizer.eos_token_id]
        prompt = tokenizer.decode(ids[: len(ids) - 2]).replace("<image>", "").split()
        assert prompt == ["<s>", *item.prompt.replace("<image>", "").split()]


def test_kept_cells_keep_the_asked_objects_in_raster_order() -> None:
    rng = np.random.default_rng(0)
    for item in synthetic_vqa.samples("train", 30):
        cells = kept_cells(item, 6, rng)
        assert len(cells) == 6 and list(cells) == sorted(cells)
        assert set(item.cells) <= set(cells.tolist())
