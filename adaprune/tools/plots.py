"""Pictures of budgets and kept tokens, as PNG files. Functions take data (numbers, curves, images), not models.

Uses matplotlib's object-oriented API (`Figure`, rendered by the Agg canvas), so no GUI backend or global pyplot
state is involved. The overlays are drawn with PIL on whatever image the caller passes, with the kept patches as
boxes in that image's pixel coordinates: for LLaVA the caller passes the image the vision tower saw (the processed,
de-normalized `pixel_values`) and one box per kept patch; other models supply their own mapping to boxes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

Box = tuple[int, int, int, int]  # left, top, right, bottom (exclusive), in pixels
DROPPED_SHADE = 0.35  # dropped patches keep this fraction of their brightness
KEPT_OUTLINE = (255, 200, 0)


def draw_kept_patches(image: Image.Image, kept_boxes: Sequence[Box]) -> Image.Image:
    """A copy of `image` with everything outside the kept boxes darkened and each kept box outlined."""
    base = image.convert("RGB")
    kept_mask = Image.new("L", base.size, 0)
    mask_draw = ImageDraw.Draw(kept_mask)
    for left, top, right, bottom in kept_boxes:
        mask_draw.rectangle([left, top, right - 1, bottom - 1], fill=255)
    shaded = Image.eval(base, lambda value: int(value * DROPPED_SHADE))
    overlay = Image.composite(base, shaded, kept_mask)
    outline = ImageDraw.Draw(overlay)
    for left, top, right, bottom in kept_boxes:
        outline.rectangle([left, top, right - 1, bottom - 1], outline=KEPT_OUTLINE)
    return overlay


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def save_overlays(panels: Sequence[tuple[str, Image.Image]], path: Path, columns: int = 4) -> Path:
    """One PNG with the overlay images side by side (wrapping after `columns`), each titled."""
    rows = -(-len(panels) // columns)
    width = min(columns, len(panels))
    figure = Figure(figsize=(3.2 * width, 3.4 * rows), layout="constrained")
    for index, (title, image) in enumerate(panels):
        axes = figure.add_subplot(rows, width, index + 1)
        axes.imshow(np.asarray(image))
        axes.set_title(title, fontsize=9)
        axes.set_axis_off()
    return _save(figure, path)


def save_budget_histogram(budgets: Sequence[int], setting: str, target: float | None, path: Path) -> Path:
    """Histogram of the per-image budgets, with their mean (and the target, if any) marked; `setting` names the
    setting that gave them (e.g. "energy_ratio 0.9")."""
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    values = np.asarray(budgets)
    bins = min(40, max(1, int(values.max() - values.min()) + 1))
    axes.hist(values, bins=bins, color="#4C72B0", edgecolor="white")
    axes.axvline(values.mean(), color="#C44E52", linewidth=2, label=f"mean {values.mean():.1f}")
    if target is not None:
        axes.axvline(target, color="black", linestyle="--", label=f"target {target:g}")
    axes.set_xlabel("tokens kept per image")
    axes.set_ylabel("images")
    axes.set_title(f"Per-image budgets at {setting} ({len(values)} images)")
    axes.legend()
    return _save(figure, path)


def save_energy_curves(
    curves: Mapping[str, Sequence[np.ndarray]], budgets: Mapping[str, int], energy_ratio: float | None, path: Path
) -> Path:
    """Energy curves E(k) of a few images (every budget unit of an image in its colour), each budget, and tau when
    the budget rule has one."""
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for index, (name, units) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        for unit, curve in enumerate(units):
            ks = np.arange(1, len(curve) + 1)
            axes.plot(ks, curve, color=colour, label=f"{name}: {budgets[name]} tokens" if unit == 0 else None)
        axes.axvline(budgets[name], color=colour, linestyle=":", linewidth=1)
    if energy_ratio is not None:
        axes.axhline(energy_ratio, color="black", linestyle="--", linewidth=1, label=f"energy ratio {energy_ratio:g}")
    axes.set_xscale("log")
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("k (top singular values kept)")
    axes.set_ylabel("spectral energy E(k)")
    axes.set_title("Energy curves")
    axes.legend(fontsize=8)
    return _save(figure, path)


def save_overlay_with_schedule(
    title: str,
    overlay: Image.Image,
    after_layer: Sequence[int],
    seen_by_layer: Sequence[int],
    budget: int,
    path: Path,
) -> Path:
    """The kept-patch overlay next to a per-layer retention schedule: the visual tokens left after each decoder
    layer (whose mean is the budget, marked) and the tokens each layer sees."""
    figure = Figure(figsize=(8.0, 3.6), layout="constrained")
    picture, curve = figure.subplots(1, 2, width_ratios=[1, 1.3])
    picture.imshow(np.asarray(overlay))
    picture.set_title(title, fontsize=9)
    picture.set_axis_off()
    layers = np.arange(len(after_layer))
    curve.plot(layers, after_layer, marker="o", color="#4C72B0", label="kept after the layer (schedule)")
    curve.step(layers, seen_by_layer, where="mid", color="#DD8452", label="seen by the layer")
    curve.axhline(budget, color="black", linestyle="--", linewidth=1, label=f"budget (mean) {budget}")
    curve.set_xlabel("decoder layer")
    curve.set_ylabel("visual tokens")
    curve.set_ylim(bottom=0)
    curve.set_title("Retention schedule", fontsize=9)
    curve.legend(fontsize=8)
    return _save(figure, path)
