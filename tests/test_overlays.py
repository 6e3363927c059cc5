"""Kept-patch overlays: LLaVA's mapping from kept token indices to patch boxes, and the drawing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from transformers import LlavaProcessor

from adaprune.tools.plots import DROPPED_SHADE, KEPT_OUTLINE, draw_kept_patches
from adaprune.tools.tiny_llava import SMALL_GEOMETRY
from adaprune.tools.workflow import llava_kept_patches, processed_image

PATCH = SMALL_GEOMETRY.patch_size
GRID = SMALL_GEOMETRY.image_size // PATCH


def test_processed_image_is_what_the_processor_produced(small_processor: LlavaProcessor, small_images: dict) -> None:
    """De-normalizing pixel_values gives back the resized, cropped 8-bit image (up to rounding)."""
    image = small_images["shapes"]
    pixel_values = small_processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    restored = np.asarray(processed_image(pixel_values, small_processor.image_processor), dtype=np.int16)
    assert restored.shape == (SMALL_GEOMETRY.image_size, SMALL_GEOMETRY.image_size, 3)
    assert np.abs(restored - np.asarray(image.convert("RGB"), dtype=np.int16)).max() <= 1


def kept_boxes(kept: list[int], tokens: int, small_processor: LlavaProcessor) -> list[tuple[int, int, int, int]]:
    inputs = {"pixel_values": torch.zeros(1, 3, SMALL_GEOMETRY.image_size, SMALL_GEOMETRY.image_size)}
    output = SimpleNamespace(kept_indices=[torch.tensor(kept)], tokens_per_image=[tokens])
    config = SimpleNamespace(vision_config=SimpleNamespace(patch_size=PATCH))
    _, boxes = llava_kept_patches(inputs, 0, output, config, small_processor.image_processor)
    return boxes


def test_llava_kept_indices_map_to_patches_in_raster_order(small_processor: LlavaProcessor) -> None:
    last = GRID * GRID - 1
    boxes = kept_boxes([0, GRID + 2, last], GRID * GRID, small_processor)
    end = GRID * PATCH
    assert boxes == [
        (0, 0, PATCH, PATCH),
        (2 * PATCH, PATCH, 3 * PATCH, 2 * PATCH),
        (end - PATCH, end - PATCH, end, end),
    ]


def test_full_strategy_cls_token_has_no_box(small_processor: LlavaProcessor) -> None:
    """With the 'full' feature strategy token 0 is [CLS]: patches start at index 1."""
    assert kept_boxes([0, 1], GRID * GRID + 1, small_processor) == [(0, 0, PATCH, PATCH)]


def test_draw_kept_patches_darkens_dropped_and_outlines_kept() -> None:
    image = Image.new("RGB", (28, 28), (200, 100, 50))
    overlay = np.asarray(draw_kept_patches(image, [(0, 0, 14, 14)]))
    assert tuple(overlay[7, 7]) == (200, 100, 50)
    assert tuple(overlay[20, 20]) == tuple(int(value * DROPPED_SHADE) for value in (200, 100, 50))
    assert tuple(overlay[0, 0]) == KEPT_OUTLINE and tuple(overlay[13, 5]) == KEPT_OUTLINE
    assert tuple(overlay[14, 5]) != KEPT_OUTLINE
    assert np.asarray(image).tolist() == np.full((28, 28, 3), (200, 100, 50)).tolist()  # the input is left as it was


def test_llava_next_boxes_are_the_kept_visual_tokens_on_the_base_crop(
    next_checkpoint, next_processor, next_images: dict
) -> None:
    """LLaVA-NeXT: the picture has the image's aspect ratio; one box per kept visual token (newlines have none),
    the base-crop tokens' boxes on that token's patch of the stretched base crop."""
    from support.oracle import image_features, load_pruned

    from adaprune.anyres_layout import packed_layout
    from adaprune.tools.workflow import OVERLAY_LONG_SIDE, llava_next_kept_patches

    model = load_pruned(next_checkpoint, energy_ratio=0.9, min_tokens=4)
    image = next_images["wide"]
    inputs = next_processor.image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        output = image_features(model, inputs)
    picture, boxes = llava_next_kept_patches(inputs, 0, output, model.config, next_processor.image_processor)
    assert picture.size == (OVERLAY_LONG_SIDE, round(image.height * OVERLAY_LONG_SIDE / image.width))
    layout = packed_layout((image.height, image.width), model.config.image_grid_pinpoints, 336, 14)
    kept = output.kept_indices[0]
    assert len(boxes) == int(output.token_budgets[0]) == int((~layout.is_newline[kept]).sum())
    assert all(0 <= left < right <= picture.width and 0 <= top < bottom <= picture.height for left, top, right, bottom in boxes)
    assert int(layout.crop[kept[0]]) == 0  # kept indices ascend: this image keeps base-crop tokens, and they come first
    row, col = divmod(int(layout.patch[kept[0]]), 24)
    cell_w, cell_h = picture.width / 24, picture.height / 24
    assert boxes[0] == (round(col * cell_w), round(row * cell_h), round((col + 1) * cell_w), round((row + 1) * cell_h))
