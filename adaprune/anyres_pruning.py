"""Pruning LLaVA-NeXT's packed any-resolution features: an image's visual tokens are split into budget units (the
whole image, or each crop), units of equal length are pruned as one batch, and the kept positions are mapped back
to the image's packed sequence, newlines following the newline policy."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.nn.utils.rnn import pad_sequence

from .anyres_layout import PackedLayout, budget_units, with_row_newlines
from .configuration_adaprune import AnyResPruningSettings
from .decoder_pruning import SelectionUnits
from .image_pruning import UnitGroup, prune_groups
from .pruning_outputs import AdaPruneImageFeaturesOutput
from .token_selection import PatchGrid, kept_indices_from_mask
from .vision_probes import TowerFeatures


@dataclass(frozen=True)
class UnitBatch:
    """Budget units of equal length, stacked: the group to prune, and each unit's packed positions (u, N)."""

    group: UnitGroup
    positions: torch.LongTensor
    unit_ids: list[int]


def packed_per_image(per_crop: torch.Tensor, layouts: list[PackedLayout]) -> list[torch.Tensor]:
    """(crops, patches, ...) values of the batch's crops as each image's (P, ...) values along its packed sequence
    (newline positions hold the base crop's first patch's; no unit uses them)."""
    crops_per_image = [1 + layout.grid_shape[0] * layout.grid_shape[1] for layout in layouts]
    patches = layouts[0].patches_per_side ** 2
    return [
        crops.flatten(0, 1)[(layout.crop * patches + layout.patch).clamp_min(0).to(crops.device)]
        for crops, layout in zip(per_crop.split(crops_per_image), layouts)
    ]


def unit_batches(
    features: TowerFeatures,
    signals: dict[str, torch.Tensor],
    settings: AnyResPruningSettings,
    layouts: list[PackedLayout],
) -> list[UnitBatch]:
    """The batch's budget units, grouped by length, with their spectrum features, signals and packed rows."""
    packed = list(features.output.pooler_output)
    device = packed[0].device
    if settings.spectrum_source == "projected":
        spectrum = packed
    else:
        spectrum = packed_per_image(features.projector_input(), layouts)
    per_image_signals = {name: packed_per_image(values, layouts) for name, values in signals.items()}

    by_length: dict[int, list[tuple[int, int, torch.LongTensor]]] = {}
    for unit_id, (image, positions) in enumerate(budget_units(layouts, settings.budget_scope)):
        by_length.setdefault(len(positions), []).append((unit_id, image, positions))
    batches = []
    for units in by_length.values():
        images = [image for _, image, _ in units]
        positions = torch.stack([unit_positions for _, _, unit_positions in units]).to(device)

        def stacked(per_image: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([per_image[image][rows] for image, rows in zip(images, positions)])

        group = UnitGroup(
            spectrum_features=stacked(spectrum),
            signals={name: stacked(values) for name, values in per_image_signals.items()},
            checked_features=() if spectrum is packed else (stacked(packed),),
            images=images,
        )
        batches.append(UnitBatch(group=group, positions=positions, unit_ids=[unit_id for unit_id, _, _ in units]))
    return batches


def packed_energy_curves(
    features: TowerFeatures, settings: AnyResPruningSettings, layouts: list[PackedLayout]
) -> list[list[torch.Tensor]]:
    """Per image, the energy curve of each of its budget units (base crop first with `budget_scope="crop"`)."""
    curves: list[list[tuple[int, torch.Tensor]]] = [[] for _ in layouts]
    for batch in unit_batches(features, {}, settings, layouts):
        unit_curves = settings.spectrum.curves(batch.group.spectrum_features)
        for unit_id, image, curve in zip(batch.unit_ids, batch.group.images, unit_curves):
            curves[image].append((unit_id, curve))
    return [[curve for _, curve in sorted(units, key=lambda unit: unit[0])] for units in curves]


def prune_packed_images(
    features: TowerFeatures,
    signals: dict[str, torch.Tensor],
    settings: AnyResPruningSettings,
    layouts: list[PackedLayout],
) -> AdaPruneImageFeaturesOutput:
    """Stock packed features cut to each image's budget units (one host sync for all budgets, one more for the
    kept newlines); kept newlines follow `newline_policy`."""
    output = features.output
    packed = list(output.pooler_output)
    batches = unit_batches(features, signals, settings, layouts)
    prunings = prune_groups([batch.group for batch in batches], settings)

    device = packed[0].device
    n_images, longest = len(packed), max(len(layout) for layout in layouts)
    keep = torch.zeros(n_images * longest, dtype=torch.long, device=device)
    units_per_image = torch.bincount(
        torch.tensor([image for batch in batches for image in batch.group.images], dtype=torch.long),
        minlength=n_images,
    )
    budgets_by_unit = torch.zeros(int(units_per_image.sum()), dtype=torch.long, device=device)
    for batch, pruning in zip(batches, prunings):
        budgets_by_unit[torch.tensor(batch.unit_ids, device=device)] = pruning.token_budgets
        unit_length = batch.positions.shape[1]
        kept_local = pruning.padded_kept_indices
        kept_positions = batch.positions.gather(1, kept_local.clamp_max(unit_length - 1))
        images = torch.tensor(batch.group.images, device=device)
        flat = images.unsqueeze(1) * longest + kept_positions
        keep.scatter_reduce_(0, flat.flatten(), (kept_local < unit_length).long().flatten(), reduce="amax")
    image_of_unit = torch.repeat_interleave(torch.arange(n_images), units_per_image).to(device)
    token_budgets = torch.zeros(n_images, dtype=torch.long, device=device).index_add_(0, image_of_unit, budgets_by_unit)
    keep = keep.view(n_images, longest).bool()
    if settings.newline_policy == "keep_rows":
        keep = with_row_newlines(
            keep,
            pad_sequence([layout.row for layout in layouts], batch_first=True, padding_value=-1).to(device),
            pad_sequence([layout.is_newline for layout in layouts], batch_first=True).to(device),
        )
    _, kept_indices = kept_indices_from_mask(keep, keep.sum(-1).tolist())
    return AdaPruneImageFeaturesOutput(
        last_hidden_state=output.last_hidden_state,
        pooler_output=[image[kept] for image, kept in zip(packed, kept_indices)],
        hidden_states=output.hidden_states,
        attentions=output.attentions,
        token_budgets=token_budgets,
        kept_indices=kept_indices,
        tokens_per_image=[len(layout) for layout in layouts],
        visual_tokens_per_image=[len(layout.token_positions) for layout in layouts],
        unit_budgets=list(budgets_by_unit.split(units_per_image.tolist())),
        packed_layouts=layouts,
        cls_attention=(
            [
                values.masked_fill(layout.is_newline.to(values.device), 0.0)
                for values, layout in zip(packed_per_image(signals["cls_attention"], layouts), layouts)
            ]
            if "cls_attention" in signals
            else None
        ),
    )


def packed_selection_units(
    layouts: list[PackedLayout], unit_budgets: list[torch.LongTensor], settings: AnyResPruningSettings, device
) -> SelectionUnits:
    """The budget units of packed images for an in-LLM selector: each unit's visual tokens (newlines belong to
    none), each crop a grid of its own, and with `newline_policy="keep_rows"` every newline kept with its row."""
    longest = max(len(layout) for layout in layouts)
    unit = torch.full((len(layouts), longest), -1, dtype=torch.long)
    slot = torch.full_like(unit, -1)
    for unit_id, (image, positions) in enumerate(budget_units(layouts, settings.budget_scope)):
        unit[image, positions] = unit_id
        slot[image, positions] = torch.arange(len(positions))

    def padded(name: str, fill: int | bool) -> torch.Tensor:
        values = [getattr(layout, name) for layout in layouts]
        return pad_sequence(values, batch_first=True, padding_value=fill).to(device)

    side = layouts[0].patches_per_side
    units = SelectionUnits(unit.to(device), slot.to(device), torch.cat(unit_budgets), int(slot.max()) + 1)
    patch = padded("patch", -1).clamp_min(0)
    grid = PatchGrid(
        cell=units.to_units(torch.stack([patch // side, patch % side], dim=-1), 0),
        view=units.to_units(padded("crop", -1), -1),
        side=side,
    )
    rows = (padded("row", -1), padded("is_newline", False)) if settings.newline_policy == "keep_rows" else None
    return replace(units, grid=grid, newline_rows=rows)
