"""Where each visual token of a LLaVA-NeXT image comes from (pure geometry, no model).

LLaVA-NeXT's processor cuts an image into a base crop (the whole image resized to one crop) and a grid of crops of
the best-fitting "pinpoint" resolution. The model packs the crops' patch features into one sequence:

    [base crop: side*side tokens] + for each row of the unpadded high-resolution grid: [its tokens] + [newline]

where the grid is the crops' patch maps tiled together, with the rows or columns that only covered the processor's
padding removed (``unpad_image``). `packed_layout` describes that sequence position by position, using
transformers' own grid and unpadding functions, so `kept_indices` (which index it) can be mapped back to crops,
patches and pixels (`patch_boxes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image


@dataclass(frozen=True)
class PackedLayout:
    """One image's packed LLaVA-NeXT token sequence, position by position (all tensors (P,), on the CPU).

    crop: index of the crop in the image's `pixel_values` (0 = base crop, 1.. = grid crops row by row); -1 at
        newline tokens.
    patch: index of the patch within its crop, row-major over the crop's side x side patches; -1 at newlines.
    row: row of the unpadded high-resolution grid the token (or newline) belongs to; -1 for base-crop tokens.
    grid_shape: (rows, columns) of grid crops.
    canvas_size: (height, width) in pixels of the pinpoint resolution the grid crops tile.
    patches_per_side: patches along a crop's side.
    """

    crop: torch.LongTensor
    patch: torch.LongTensor
    row: torch.LongTensor
    grid_shape: tuple[int, int]
    canvas_size: tuple[int, int]
    patches_per_side: int

    def __len__(self) -> int:
        return len(self.crop)

    @property
    def is_newline(self) -> torch.BoolTensor:
        return self.crop < 0

    @property
    def token_positions(self) -> torch.LongTensor:
        """Positions of the visual (non-newline) tokens, ascending."""
        return (~self.is_newline).nonzero().squeeze(-1)

    @property
    def newline_positions(self) -> torch.LongTensor:
        """Positions of the newline tokens, one per grid row, ascending (so row r's newline is entry r)."""
        return self.is_newline.nonzero().squeeze(-1)


def packed_layout(
    image_size: tuple[int, int], grid_pinpoints: list[list[int]], crop_size: int, patch_size: int
) -> PackedLayout:
    """The packed layout of an image of `image_size` (height, width) for a LLaVA-NeXT config's geometry."""
    side = crop_size // patch_size
    grid_rows, grid_cols = get_anyres_image_grid_shape(list(image_size), grid_pinpoints, crop_size)
    map_rows = torch.arange(grid_rows * side).unsqueeze(1)
    map_cols = torch.arange(grid_cols * side).unsqueeze(0)
    crop_map = 1 + (map_rows // side) * grid_cols + map_cols // side
    patch_map = (map_rows % side) * side + map_cols % side
    crop_map, patch_map = unpad_image(torch.stack([crop_map, patch_map]), list(image_size))
    n_rows = crop_map.shape[0]
    newline_column = torch.full((n_rows, 1), -1)

    base_patches = torch.arange(side * side)
    crop = torch.cat([torch.zeros_like(base_patches), torch.cat([crop_map, newline_column], 1).flatten()])
    patch = torch.cat([base_patches, torch.cat([patch_map, newline_column], 1).flatten()])
    grid_row = torch.arange(n_rows).unsqueeze(1).expand(n_rows, crop_map.shape[1] + 1).flatten()
    row = torch.cat([torch.full_like(base_patches, -1), grid_row])
    return PackedLayout(
        crop=crop,
        patch=patch,
        row=row,
        grid_shape=(grid_rows, grid_cols),
        canvas_size=tuple(select_best_resolution(list(image_size), grid_pinpoints)),
        patches_per_side=side,
    )


def config_packed_layout(config: Any, image_size: Sequence[int] | torch.Tensor) -> PackedLayout:
    """`packed_layout` under a `LlavaNextConfig`'s geometry (pinpoints, crop and patch size), for an image of
    `image_size` (height, width; a tensor such as a row of the processor's `image_sizes` is accepted)."""
    size = image_size.tolist() if isinstance(image_size, torch.Tensor) else list(image_size)
    vision = config.vision_config
    height, width = int(size[0]), int(size[1])
    return packed_layout((height, width), config.image_grid_pinpoints, vision.image_size, vision.patch_size)


def patch_boxes(layout: PackedLayout, image_size: tuple[int, int]) -> torch.Tensor:
    """(P, 4) boxes (x0, y0, x1, y1) in the original image's pixels covered by each packed token; NaN at newlines.

    The base crop is the whole image stretched to one crop. Grid crops tile the canvas, on which the processor
    placed the image resized to fit (aspect ratio kept) and centred; boxes are clipped to the image.
    """
    height, width = image_size
    side = layout.patches_per_side
    patch_row = (layout.patch // side).double()
    patch_col = (layout.patch % side).double()
    is_base = layout.crop == 0

    base_y = patch_row / side * height
    base_x = patch_col / side * width
    base_h, base_w = height / side, width / side

    canvas_h, canvas_w = layout.canvas_size
    crop_h, crop_w = canvas_h / layout.grid_shape[0], canvas_w / layout.grid_shape[1]
    grid_index = (layout.crop - 1).clamp_min(0)
    canvas_y = (grid_index // layout.grid_shape[1]).double() * crop_h + patch_row * crop_h / side
    canvas_x = (grid_index % layout.grid_shape[1]).double() * crop_w + patch_col * crop_w / side
    scale = min(canvas_h / height, canvas_w / width)
    offset_y = (canvas_h - height * scale) / 2
    offset_x = (canvas_w - width * scale) / 2
    grid_y = (canvas_y - offset_y) / scale
    grid_x = (canvas_x - offset_x) / scale
    grid_h, grid_w = crop_h / side / scale, crop_w / side / scale

    y0 = torch.where(is_base, base_y, grid_y)
    x0 = torch.where(is_base, base_x, grid_x)
    y1 = y0 + torch.where(is_base, torch.full_like(y0, base_h), grid_h)
    x1 = x0 + torch.where(is_base, torch.full_like(x0, base_w), grid_w)
    boxes = torch.stack([x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)], -1)
    return boxes.masked_fill(layout.is_newline.unsqueeze(-1), float("nan"))


def budget_units(layouts: Sequence[PackedLayout], scope: str) -> list[tuple[int, torch.LongTensor]]:
    """Each budget unit of a batch as (image index, packed positions of its visual tokens, ascending).

    scope "image": one unit per image over all its visual tokens (base crop and grid; newlines excluded).
    scope "crop": one unit per crop that has tokens left after unpadding (base crop first, then the grid crops).
    """
    if scope == "image":
        return [(image, layout.token_positions) for image, layout in enumerate(layouts)]
    if scope == "crop":
        return [
            (image, positions)
            for image, layout in enumerate(layouts)
            for crop in range(1 + layout.grid_shape[0] * layout.grid_shape[1])
            if len(positions := (layout.crop == crop).nonzero().squeeze(-1))
        ]
    raise ValueError(f"budget_scope must be 'image' or 'crop', got {scope!r}")


def with_row_newlines(keep: torch.BoolTensor, row: torch.LongTensor, is_newline: torch.BoolTensor) -> torch.BoolTensor:
    """`keep` (n, P) plus the newline of every grid row in which a visual token is kept.

    row: (n, P) grid row of each position (-1 for base-crop tokens and padding); is_newline: (n, P).
    """
    n_rows = int(row.shape[-1])
    kept_grid_token = keep & ~is_newline & (row >= 0)
    row_hit = torch.zeros(keep.shape[0], n_rows + 1, dtype=torch.long, device=keep.device)
    row_hit.scatter_reduce_(-1, torch.where(kept_grid_token, row, n_rows), kept_grid_token.long(), reduce="amax")
    return keep | (is_newline & row_hit.gather(-1, row.clamp_min(0)).bool())
