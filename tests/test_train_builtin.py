"""The training script's batches are what the model sees at inference: the processor's pixels, the prompt with k
image tokens, labels on the answer only, and the asked objects among the kept cells."""

from __future__ import annotations

import numpy as np
import torch

from adaprune.tools import synthetic_vqa
from adaprune.tools.builtin_llava import build_builtin_processor
from adaprune.tools.train_builtin import NOUNS, SINK_WEIGHT, Batches, kept_cells


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


def test_hints_point_each_naming_word_at_the_objects_it_names() -> None:
    processor = build_builtin_processor()
    tokenizer = processor.tokenizer
    items = list(synthetic_vqa.samples("train", 60))
    rng = np.random.default_rng(0)
    cells = torch.from_numpy(np.stack([kept_cells(item, 20, rng) for item in items]))
    tokens = Batches(processor, len(items), 10, 0).token_batch(items, 20)
    hints = Batches(processor, len(items), 10, 0).noun_batch(items, cells, tokens)
    for row, item in enumerate(items):
        ids = tokens["input_ids"][row]
        first_image = int((ids == processor.image_token_id).nonzero()[0])
        nouns = hints["noun_rows"][row][hints["noun_valid"][row]].tolist()
        words = tokenizer.convert_ids_to_tokens(ids[nouns].tolist())
        assert len(nouns) == (2 if item.question_type == "position" else 1)
        assert words == [word for word in item.question.split() if word in NOUNS]
        assert int(hints["last_noun"][row]) == nouns[-1]
        for slot, noun in enumerate(nouns):
            targets = hints["noun_targets"][row, slot]
            pointed = targets.nonzero().flatten().tolist()
            torch.testing.assert_close(targets.sum(), torch.tensor(1.0))
            named = [int(cells[row, at - first_image]) for at in pointed if at >= first_image]
            by_cell = {obj.row * synthetic_vqa.GRID + obj.col: obj for obj in item.objects}
            probe = int(hints["noun_probes"][row, slot])
            if item.question_type == "count":
                assert pointed[0] == 0 and len(named) == int(item.answer)  # the BOS sink and every counted shape
                if named:  # the sink weighs as much as SINK_WEIGHT counted shapes
                    torch.testing.assert_close(targets[0], targets[pointed[1]] * SINK_WEIGHT)
                assert all(synthetic_vqa.PLURALS[by_cell[cell].label] == words[0] for cell in named)
                assert probe == synthetic_vqa.GRID + int(item.answer)
            elif item.question_type == "presence" and item.answer == "no":
                assert pointed == [0] and probe == -100
            else:
                assert len(named) == 1 == len(pointed)
                assert named[0] == item.cells[slot] and probe == named[0] % synthetic_vqa.GRID
                obj = by_cell[named[0]]
                assert words[slot] in (obj.label, "tile" if obj.kind == "tile" else "object")
