"""Kept-patch overlays: LLaVA's mapping from kept token indices to patch boxes, and the drawing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from transformers import LlavaProcessor

from adaprune.plots import DROPPED_SHADE, KEPT_OUTLINE, draw_kept_patches
from adaprune.tiny_llava import SMALL_GEOMETRY
from adaprune.workflow import llava_kept_patches, processed_image

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
