"""The any-resolution layout (pure geometry): where each packed LLaVA-NeXT token comes from, budget units, newlines."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaNextForConditionalGeneration

from adaprune.anyres_layout import budget_units, packed_layout, patch_boxes, with_row_newlines
from adaprune.tools.tiny_llava_next import LLAVA_NEXT_PINPOINTS

CROP, PATCH = 336, 14
SIDE = CROP // PATCH
# (height, width): each pinpoint's grid, unpadding of rows and of columns, extreme aspect ratios, tiny images.
SIZES = [(300, 600), (560, 280), (500, 800), (336, 336), (250, 960), (1000, 200), (200, 1000), (37, 1500), (10, 10)]


def layout(size: tuple[int, int]):
    return packed_layout(size, LLAVA_NEXT_PINPOINTS, CROP, PATCH)


@pytest.mark.parametrize("size", SIZES)
def test_layout_is_the_stock_packing(size: tuple[int, int], next_stock: LlavaNextForConditionalGeneration) -> None:
    """Features coding (crop, patch) packed by stock `pack_image_features` (newline = -1) read back as the layout."""
    result = layout(size)
    n_crops = 1 + result.grid_shape[0] * result.grid_shape[1]
    crops = torch.arange(n_crops).view(-1, 1).expand(n_crops, SIDE * SIDE)
    patches = torch.arange(SIDE * SIDE).expand(n_crops, -1)
    coded = torch.stack([crops, patches], -1).double()
    packed, lengths = next_stock.model.pack_image_features(
        [coded], torch.tensor([size]), "default", image_newline=torch.tensor([-1.0, -1.0], dtype=torch.float64)
    )
    assert lengths.tolist() == [len(result)]
    assert torch.equal(packed[0][:, 0].long(), result.crop)
    assert torch.equal(packed[0][:, 1].long(), result.patch)


@pytest.mark.parametrize("size", SIZES)
def test_rows_and_newlines(size: tuple[int, int]) -> None:
    """Base tokens come first with no row; each grid row is its tokens then its newline, rows numbered in order."""
    result = layout(size)
    base = SIDE * SIDE
    assert torch.equal(result.crop[:base], torch.zeros(base, dtype=torch.long))
    assert torch.equal(result.row[:base], torch.full((base,), -1))
    newlines = result.newline_positions
    assert torch.equal(result.row[newlines], torch.arange(len(newlines)))
    assert int(newlines[-1]) == len(result) - 1
    widths = torch.diff(torch.cat([torch.tensor([base - 1]), newlines])) - 1
    assert len(set(widths.tolist())) == 1 and int(widths[0]) >= 1
    grid_rows = result.row[base:]
    assert torch.equal(grid_rows, torch.arange(len(newlines)).repeat_interleave(int(widths[0]) + 1))


@pytest.mark.parametrize("size", SIZES)
def test_patch_boxes_cover_the_image(size: tuple[int, int]) -> None:
    """Base-crop boxes tile the whole image; grid boxes lie in it and cover it (up to the unpadding's rounding)."""
    height, width = size
    result = layout(size)
    boxes = patch_boxes(result, size)
    assert torch.isnan(boxes[result.is_newline]).all()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    base = result.crop == 0
    assert float(areas[base].sum()) == pytest.approx(height * width, rel=1e-9)
    grid = ~base & ~result.is_newline
    inside = (boxes[grid, 0] >= 0) & (boxes[grid, 1] >= 0) & (boxes[grid, 2] <= width) & (boxes[grid, 3] <= height)
    assert bool(inside.all())
    assert float(areas[grid].sum()) == pytest.approx(height * width, rel=0.1)
    assert float(areas[grid].min()) > 0


def test_budget_units_partition_the_visual_tokens() -> None:
    """Scope "image": one unit per image with all its visual tokens; "crop": one per non-empty crop, in order."""
    layouts = [layout((500, 800)), layout((37, 1500))]
    image_units = budget_units(layouts, "image")
    assert [image for image, _ in image_units] == [0, 1]
    for (_, positions), item in zip(image_units, layouts):
        assert torch.equal(positions, item.token_positions)
    crop_units = budget_units(layouts, "crop")
    for image, item in enumerate(layouts):
        units = [positions for owner, positions in crop_units if owner == image]
        assert torch.equal(torch.cat(units).sort().values, item.token_positions)
        crops = [set(item.crop[positions].tolist()) for positions in units]
        assert all(len(crop) == 1 for crop in crops)
        assert [crop.pop() for crop in crops] == sorted({int(crop) for crop in item.crop if crop >= 0})
    assert len([1 for owner, _ in crop_units if owner == 0]) == 5
    with pytest.raises(ValueError, match="budget_scope must be 'image' or 'crop', got 'tile'"):
        budget_units(layouts, "tile")


def test_with_row_newlines_keeps_the_newline_of_rows_that_keep_a_token() -> None:
    """Two rows of two tokens after a two-token base; padding (row -1, no newline) never becomes kept."""
    row = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1, -1], [-1, -1, 0, 0, 0, 1, 1, 1, -1]])
    is_newline = torch.tensor([[0, 0, 0, 0, 1, 0, 0, 1, 0]] * 2, dtype=torch.bool)
    keep = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    result = with_row_newlines(keep, row, is_newline)
    assert result.long().tolist() == [[1, 0, 0, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0]]
