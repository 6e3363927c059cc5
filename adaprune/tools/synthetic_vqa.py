"""A synthetic visual-question task whose answers need the image and whose images range from plain to dense.

A scene is a 12 x 12 grid of 16-pixel cells (192 px, one cell per patch of the built-in model). Some cells hold an
object: a coloured shape, or a white tile with a coloured digit (glyph-like text). Sparse scenes have 1-3 objects
on a plain background, medium ones 5-10 on a grey gradient, dense ones 16-32 over grey clutter in every empty cell.
Backgrounds and clutter are grey, so they never share a colour with an object.

Questions (one per scene, with a closed answer vocabulary so accuracy is exact match):

- colour:   "what colour is the circle ?"                       (the only circle)            -> red
- shape:    "what shape is the blue object ?"                  (the only blue shape)        -> square
- count:    "how many triangles are there ?"                   (0-5)                        -> 3
- position: "is the red circle left or right of the blue square ?" (both unique)            -> left
- presence: "is there a green cross ?"                                                        -> yes / no
- glyph:    "what digit is on the purple tile ?"              (the only purple tile)        -> 7

The scene is drawn to fit the question (the object it asks about is placed first, the others avoid making it
ambiguous), so every question type occurs at every density. Every sample is a pure function of (split, index):
`sample(split, index)` draws from `numpy.random.default_rng([split seed, index])`.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

GRID = 12
CELL = 16
IMAGE_SIZE = GRID * CELL
OBJECT_SIZE = 12  # pixels of an object inside its cell (2-pixel margin)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 30),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "diamond": "diamonds"}
DIGITS = tuple(str(digit) for digit in range(10))
TILE_COLOUR = (255, 255, 255)
# 3 x 5 bitmaps of the digits, rows top to bottom, drawn at 2 pixels per bit.
DIGIT_FONT: dict[str, tuple[str, ...]] = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "011", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
}
MAX_COUNT = 5

DENSITIES: dict[str, tuple[int, int]] = {"sparse": (1, 3), "medium": (5, 10), "dense": (16, 32)}
QUESTION_TYPES = ("colour", "shape", "count", "position", "presence", "glyph")
ANSWERS = (*COLOURS, *SHAPES, "yes", "no", "left", "right", *DIGITS)
QUESTION_WORDS = (
    *("what", "colour", "shape", "digit", "is", "the", "on", "tile", "object", "how", "many", "are", "there"),
    *("left", "or", "right", "of", "a", "?", *PLURALS.values()),
)

SPLIT_SEEDS = {"train": 1, "calibration": 2, "test": 3}
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


@dataclass(frozen=True)
class SceneObject:
    """One object in a cell: a shape (`kind='shape'`, `label` a shape name) or a tile (`kind='tile'`, a digit)."""

    row: int
    col: int
    kind: str
    colour: str
    label: str


@dataclass(frozen=True)
class Sample:
    """One question about one scene. `cells` are the grid cells (row * 12 + col) of the objects the question is
    about (empty for questions about absence or counts of zero)."""

    split: str
    index: int
    density: str
    question_type: str
    question: str
    answer: str
    objects: tuple[SceneObject, ...]
    background: dict[str, Any] = field(repr=False)
    cells: tuple[int, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.split}-{self.index}"

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(question=self.question)

    def image(self) -> Image.Image:
        return Image.fromarray(self.pixels())

    def pixels(self) -> np.ndarray:
        """The scene as a (192, 192, 3) uint8 array."""
        return render(self.objects, self.background)


def _background(density: str, rng: np.random.Generator) -> dict[str, Any]:
    """How the empty canvas looks: a plain grey, a grey gradient, or grey clutter in every cell (seeded)."""
    base = int(rng.integers(40, 110))
    if density == "sparse":
        return {"kind": "plain", "grey": base}
    if density == "medium":
        return {
            "kind": "gradient",
            "grey": base,
            "rise": int(rng.integers(30, 80)),
            "vertical": bool(rng.random() < 0.5),
        }
    return {"kind": "clutter", "grey": base, "seed": int(rng.integers(2**31))}


def _draw_background(background: dict[str, Any]) -> np.ndarray:
    grey = background["grey"]
    if background["kind"] == "plain":
        return np.full((IMAGE_SIZE, IMAGE_SIZE, 3), grey, np.uint8)
    if background["kind"] == "gradient":
        ramp = grey + np.linspace(0, background["rise"], IMAGE_SIZE)
        plane = np.tile(ramp[:, None] if background["vertical"] else ramp[None, :], (1, 1))
        plane = np.broadcast_to(plane, (IMAGE_SIZE, IMAGE_SIZE))
        return np.repeat(plane[..., None], 3, -1).round().astype(np.uint8)
    rng = np.random.default_rng(background["seed"])
    canvas = np.full((IMAGE_SIZE, IMAGE_SIZE), grey, np.int16)
    for _ in range(GRID * GRID * 2):  # grey strokes and blocks, a few pixels each, across the whole canvas
        x, y = rng.integers(0, IMAGE_SIZE, 2)
        w, h = rng.integers(1, 9, 2)
        canvas[y : y + h, x : x + w] += int(rng.integers(-45, 46))
    grey_canvas = np.clip(canvas, 0, 200).astype(np.uint8)
    return np.repeat(grey_canvas[..., None], 3, -1)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x0, y0 = obj.col * CELL + 2, obj.row * CELL + 2
    x1, y1 = x0 + OBJECT_SIZE - 1, y0 + OBJECT_SIZE - 1
    colour = COLOURS[obj.colour]
    if obj.kind == "tile":
        draw.rectangle([x0, y0, x1, y1], fill=TILE_COLOUR)
        for r, bits in enumerate(DIGIT_FONT[obj.label]):
            for c, bit in enumerate(bits):
                if bit == "1":
                    left, top = x0 + 3 + 2 * c, y0 + 1 + 2 * r
                    draw.rectangle([left, top, left + 1, top + 1], fill=colour)
        return
    middle_x, middle_y = (x0 + x1) / 2, (y0 + y1) / 2
    if obj.label == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=colour)
    elif obj.label == "square":
        draw.rectangle([x0 + 1, y0 + 1, x1 - 1, y1 - 1], fill=colour)
    elif obj.label == "triangle":
        draw.polygon([(middle_x, y0), (x1, y1), (x0, y1)], fill=colour)
    elif obj.label == "cross":
        draw.rectangle([x0 + 4, y0, x1 - 4, y1], fill=colour)
        draw.rectangle([x0, y0 + 4, x1, y1 - 4], fill=colour)
    else:  # diamond
        draw.polygon([(middle_x, y0), (x1, middle_y), (middle_x, y1), (x0, middle_y)], fill=colour)


def render(objects: tuple[SceneObject, ...], background: dict[str, Any]) -> np.ndarray:
    """Draws the background, then each object in its cell, without anti-aliasing (object colours stay exact)."""
    image = Image.fromarray(_draw_background(background))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_object(draw, obj)
    return np.asarray(image)


class _Scene:
    """Objects placed in free cells under a rule that each new object must satisfy."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.free = [int(cell) for cell in rng.permutation(GRID * GRID)]
        self.objects: list[SceneObject] = []

    def place(self, kind: str, colour: str, label: str, col_range: tuple[int, int] | None = None) -> SceneObject:
        for position, cell in enumerate(self.free):
            if col_range is None or col_range[0] <= cell % GRID <= col_range[1]:
                del self.free[position]
                obj = SceneObject(cell // GRID, cell % GRID, kind, colour, label)
                self.objects.append(obj)
                return obj
        raise RuntimeError("no free cell in the requested columns")

    def fill(self, total: int, allowed) -> None:
        """Adds random shapes and tiles until there are `total` objects, each passing `allowed(kind, colour, label)`."""
        while len(self.objects) < total:
            kind = "tile" if self.rng.random() < 0.25 else "shape"
            colour = str(self.rng.choice(list(COLOURS)))
            label = str(self.rng.choice(DIGITS if kind == "tile" else SHAPES))
            if allowed(kind, colour, label):
                self.place(kind, colour, label)


def _pick(rng: np.random.Generator, options) -> str:
    return str(rng.choice(list(options)))


def _question(question_type: str, total: int, scene: _Scene) -> tuple[str, str, list[SceneObject]]:
    """Places the objects a question is about and fills the scene with `total` objects that keep it unambiguous;
    returns (question, answer, the objects asked about)."""
    rng = scene.rng
    if question_type == "colour":
        shape, colour = _pick(rng, SHAPES), _pick(rng, COLOURS)
        target = scene.place("shape", colour, shape)
        scene.fill(total, lambda kind, c, label: kind == "tile" or label != shape)
        return f"what colour is the {shape} ?", colour, [target]
    if question_type == "shape":
        shape, colour = _pick(rng, SHAPES), _pick(rng, COLOURS)
        target = scene.place("shape", colour, shape)
        scene.fill(total, lambda kind, c, label: kind == "tile" or c != colour)
        return f"what shape is the {colour} object ?", shape, [target]
    if question_type == "glyph":
        digit, colour = _pick(rng, DIGITS), _pick(rng, COLOURS)
        target = scene.place("tile", colour, digit)
        scene.fill(total, lambda kind, c, label: kind == "shape" or c != colour)
        return f"what digit is on the {colour} tile ?", digit, [target]
    if question_type == "count":
        shape = _pick(rng, SHAPES)
        count = int(rng.integers(0, min(MAX_COUNT, total) + 1))
        targets = [scene.place("shape", _pick(rng, COLOURS), shape) for _ in range(count)]
        scene.fill(max(total, count), lambda kind, c, label: kind == "tile" or label != shape)
        return f"how many {PLURALS[shape]} are there ?", str(count), targets
    if question_type == "presence":
        shape, colour = _pick(rng, SHAPES), _pick(rng, COLOURS)
        present = bool(rng.random() < 0.5)
        targets = [scene.place("shape", colour, shape)] if present else []
        scene.fill(total, lambda kind, c, label: kind == "tile" or (c, label) != (colour, shape))
        return f"is there a {colour} {shape} ?", "yes" if present else "no", targets
    # position: two shapes with unique (colour, shape) in different columns
    first_col = int(rng.integers(0, GRID))
    left_side = first_col < GRID - 1 and (first_col == 0 or rng.random() < 0.5)
    (colour_a, shape_a), (colour_b, shape_b) = ((_pick(rng, COLOURS), _pick(rng, SHAPES)) for _ in range(2))
    while (colour_b, shape_b) == (colour_a, shape_a):
        colour_b, shape_b = _pick(rng, COLOURS), _pick(rng, SHAPES)
    first = scene.place("shape", colour_a, shape_a, (first_col, first_col))
    second = scene.place("shape", colour_b, shape_b, (first_col + 1, GRID - 1) if left_side else (0, first_col - 1))
    asked = {(colour_a, shape_a), (colour_b, shape_b)}
    scene.fill(max(total, 2), lambda kind, c, label: kind == "tile" or (c, label) not in asked)
    question = f"is the {colour_a} {shape_a} left or right of the {colour_b} {shape_b} ?"
    return question, "left" if left_side else "right", [first, second]


def sample(split: str, index: int) -> Sample:
    """Sample `index` of `split` ('train', 'calibration' or 'test'): density, question type and scene."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_SEEDS)}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    density = _pick(rng, DENSITIES)
    question_type = _pick(rng, QUESTION_TYPES)
    low, high = DENSITIES[density]
    total = int(rng.integers(low, high + 1))
    background = _background(density, rng)
    scene = _Scene(rng)
    question, answer, targets = _question(question_type, total, scene)
    return Sample(
        split=split,
        index=index,
        density=density,
        question_type=question_type,
        question=question,
        answer=answer,
        objects=tuple(scene.objects),
        background=background,
        cells=tuple(obj.row * GRID + obj.col for obj in targets),
    )


def samples(split: str, count: int, start: int = 0) -> Iterator[Sample]:
    for index in range(start, start + count):
        yield sample(split, index)


def vocabulary() -> list[str]:
    """Every word a prompt or an answer of the task can contain (the built-in tokenizer's words)."""
    words = ["USER:", "ASSISTANT:", *QUESTION_WORDS, *ANSWERS]
    return list(dict.fromkeys(words))


def to_dataset(split: str, count: int):
    """The first `count` samples of `split` as a `datasets.Dataset` (image, question, answer, density, type, id)."""
    import datasets

    rows = [sample(split, index) for index in range(count)]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "density": datasets.Value("string"),
            "question_type": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "id": [row.id for row in rows],
            "image": [row.image() for row in rows],
            "question": [row.question for row in rows],
            "answer": [row.answer for row in rows],
            "density": [row.density for row in rows],
            "question_type": [row.question_type for row in rows],
        },
        features=features,
    )


LMMS_EVAL_TASK = Path(__file__).parent / "lmms_eval_task"


def write_lmms_eval_task(directory: Path, count: int) -> Path:
    """An lmms-eval task folder for `--include_path DIRECTORY`: the task definition and the first `count` test
    questions (questions.parquet). Returns the folder."""
    folder = Path(directory) / "adaprune_synthetic_vqa"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("adaprune_synthetic_vqa.yaml", "utils.py"):
        shutil.copyfile(LMMS_EVAL_TASK / name, folder / name)
    to_dataset("test", count).to_parquet(str(folder / "questions.parquet"))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the synthetic visual-question task for lmms-eval.")
    parser.add_argument("--lmms-eval-task", type=Path, required=True, metavar="DIR", help="folder for --include_path")
    parser.add_argument("--questions", type=int, default=2000, help="first N test questions (default 2000)")
    args = parser.parse_args(argv)
    print(f"wrote {write_lmms_eval_task(args.lmms_eval_task, args.questions)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
