"""The synthetic visual-question task: deterministic, answers right by construction (read back from the pixels by
code independent of the generator's), densities as declared, a closed vocabulary, and no answer in the text."""

from __future__ import annotations

import re

import numpy as np
import pytest

from adaprune.tools import synthetic_vqa
from adaprune.tools.evaluation import text_only_accuracy
from adaprune.tools.synthetic_vqa import CELL, COLOURS, DENSITIES, GRID, QUESTION_TYPES, sample

PALETTE = {rgb: name for name, rgb in COLOURS.items()}
WHITE = (255, 255, 255)


def read_shape(mask: np.ndarray) -> str:
    """A filled shape's name from its pixel mask, by the widths of its rows."""
    widths = mask.sum(axis=1)
    widths = widths[widths > 0]
    top, bottom, widest, area = int(widths[0]), int(widths[-1]), int(widths.max()), int(mask.sum())
    if top == bottom == widest:
        return "square"
    if bottom > top + 4:
        return "triangle"
    if top == bottom == 4 and widest == 12 and len(set(widths.tolist())) == 2:
        return "cross"
    return "circle" if area > 95 else "diamond"


def read_scene(pixels: np.ndarray) -> list[dict]:
    """Objects as seen in the picture: each cell holding a palette colour, its kind, colour, label and column."""
    objects = []
    for row in range(GRID):
        for col in range(GRID):
            cell = pixels[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
            colours = {tuple(int(v) for v in rgb) for rgb in cell.reshape(-1, 3)}
            named = [PALETTE[rgb] for rgb in colours if rgb in PALETTE]
            if not named:
                continue
            assert len(named) == 1, f"cell {row},{col} holds several object colours: {named}"
            mask = (cell == COLOURS[named[0]]).all(axis=-1)
            if WHITE in colours:
                bits = tuple("".join("1" if mask[3 + 2 * r, 5 + 2 * c] else "0" for c in range(3)) for r in range(5))
                digit = {glyph: name for name, glyph in synthetic_vqa.DIGIT_FONT.items()}[bits]
                objects.append({"kind": "tile", "colour": named[0], "label": digit, "col": col})
            else:
                objects.append({"kind": "shape", "colour": named[0], "label": read_shape(mask), "col": col})
    return objects


def answer_from_scene(question: str, objects: list[dict]) -> str:
    """The answer to a question about the objects read from the picture."""
    shapes = [obj for obj in objects if obj["kind"] == "shape"]
    tiles = [obj for obj in objects if obj["kind"] == "tile"]

    def only(candidates: list[dict]) -> dict:
        assert len(candidates) == 1, f"{question!r} is ambiguous: {candidates}"
        return candidates[0]

    if match := re.fullmatch(r"what colour is the (\w+) \?", question):
        return only([obj for obj in shapes if obj["label"] == match[1]])["colour"]
    if match := re.fullmatch(r"what shape is the (\w+) object \?", question):
        return only([obj for obj in shapes if obj["colour"] == match[1]])["label"]
    if match := re.fullmatch(r"what digit is on the (\w+) tile \?", question):
        return only([obj for obj in tiles if obj["colour"] == match[1]])["label"]
    if match := re.fullmatch(r"how many (\w+) are there \?", question):
        return str(sum(synthetic_vqa.PLURALS[obj["label"]] == match[1] for obj in shapes))
    if match := re.fullmatch(r"is there a (\w+) (\w+) \?", question):
        return "yes" if any((obj["colour"], obj["label"]) == (match[1], match[2]) for obj in shapes) else "no"
    match = re.fullmatch(r"is the (\w+) (\w+) left or right of the (\w+) (\w+) \?", question)
    assert match, f"unknown question {question!r}"
    first = only([obj for obj in shapes if (obj["colour"], obj["label"]) == (match[1], match[2])])
    second = only([obj for obj in shapes if (obj["colour"], obj["label"]) == (match[3], match[4])])
    assert first["col"] != second["col"]
    return "left" if first["col"] < second["col"] else "right"


def test_the_same_sample_is_drawn_again_and_different_ones_differ() -> None:
    first, again = sample("test", 17), sample("test", 17)
    assert first.question == again.question and first.answer == again.answer
    assert np.array_equal(first.pixels(), again.pixels())
    others = [sample("test", index) for index in range(18, 24)] + [sample("train", 17), sample("calibration", 17)]
    assert all(not np.array_equal(first.pixels(), other.pixels()) for other in others)


@pytest.mark.parametrize("split", ["test", "calibration"])
def test_answers_read_back_from_the_pixels_are_the_recorded_ones(split: str) -> None:
    checked = {kind: 0 for kind in QUESTION_TYPES}
    for index in range(150):
        item = sample(split, index)
        objects = read_scene(item.pixels())
        assert len(objects) == len(item.objects)
        assert answer_from_scene(item.question, objects) == item.answer, (item.id, item.question)
        checked[item.question_type] += 1
    assert min(checked.values()) >= 10, checked


def test_shapes_are_read_as_drawn() -> None:
    for shape in synthetic_vqa.SHAPES:
        obj = synthetic_vqa.SceneObject(0, 0, "shape", "red", shape)
        pixels = synthetic_vqa.render((obj,), {"kind": "plain", "grey": 50})
        assert read_scene(pixels) == [{"kind": "shape", "colour": "red", "label": shape, "col": 0}]


def test_densities_types_and_answers_cover_the_declared_ranges() -> None:
    items = [sample("train", index) for index in range(600)]
    for item in items:
        low, high = DENSITIES[item.density]
        assert low <= len(item.objects) <= max(high, 2), item.id
        assert item.answer in synthetic_vqa.ANSWERS
        assert set(item.prompt.split()) - {"<image>"} <= set(synthetic_vqa.vocabulary())
    assert {item.density for item in items} == set(DENSITIES)
    assert {item.question_type for item in items} == set(QUESTION_TYPES)
    assert {item.answer for item in items} == set(synthetic_vqa.ANSWERS)


def test_a_model_that_sees_only_the_question_is_near_chance() -> None:
    test = [sample("test", index) for index in range(1000)]
    train = [sample("train", index) for index in range(5000)]
    accuracy = text_only_accuracy(test, train)
    # chance per type: colour 1/6, shape 1/5, digit 1/10, yes/no and left/right 1/2, counts 0-5 skewed to small
    assert 0.2 < accuracy < 0.4, accuracy


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown split 'dev'; expected one of train, calibration, test"):
        sample("dev", 0)
