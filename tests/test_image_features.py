"""get_image_features of the pruning model: budgets from the right matrix, the right tokens kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.oracle import load_pruned
from transformers import LlavaProcessor

from adaprune.token_selection import evenly_spaced_mask


def reference_curves(features: torch.Tensor) -> np.ndarray:
    """Cumulative energy of each centered image in float64: (n, N, d) -> (n, N)."""
    matrices = features.double().numpy()
    matrices = matrices - matrices.mean(axis=1, keepdims=True)
    energies = np.linalg.svd(matrices, compute_uv=False) ** 2
    curves = np.cumsum(energies, axis=-1) / energies.sum(-1, keepdims=True)
    return np.concatenate([curves, np.ones((len(curves), features.shape[1] - curves.shape[1]))], axis=-1)


def well_separated_ratio(curves: np.ndarray) -> tuple[float, list[int]]:
    """An energy ratio in [0.5, 0.95] far from every curve point (no float32 ties), and the reference budgets."""
    candidates = np.linspace(0.5, 0.95, 451)
    margins = np.abs(candidates[:, None] - curves.reshape(1, -1)).min(-1)
    ratio = float(candidates[margins.argmax()])
    assert margins.max() > 1e-4
    return ratio, [int((curve < ratio).sum()) + 1 for curve in curves]


@pytest.fixture(scope="module")
def pixel_values(small_processor: LlavaProcessor, small_images: dict) -> torch.Tensor:
    return small_processor.image_processor(list(small_images.values()), return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("source", ["vision", "projected"])
def test_budgets_follow_the_float64_spectrum_of_the_chosen_features(
    source: str, small_checkpoint, pixel_values: torch.Tensor
) -> None:
    """Budgets equal a float64 SVD of the tower's layer -2 patch features, or of the projector output."""
    disabled = load_pruned(small_checkpoint, enabled=False)
    with torch.no_grad():
        stock = disabled.get_image_features(pixel_values=pixel_values)
    features = stock.hidden_states[-2][:, 1:] if source == "vision" else torch.stack(list(stock.pooler_output))
    ratio, expected = well_separated_ratio(reference_curves(features))
    pruned = load_pruned(small_checkpoint, energy_ratio=ratio, min_tokens=1, spectrum_source=source)
    with torch.no_grad():
        budgets = pruned.get_image_features(pixel_values=pixel_values).token_budgets
    assert budgets.tolist() == expected


def test_cls_attention_keeps_the_most_attended_patches(small_checkpoint, pixel_values: torch.Tensor) -> None:
    """Kept tokens are the top-k of the [CLS] attention that an eager tower reports at the feature layer."""
    pruned = load_pruned(small_checkpoint, energy_ratio=0.9, min_tokens=3)
    assert pruned.model.vision_tower.config._attn_implementation == "sdpa"
    eager = load_pruned(small_checkpoint, enabled=False)
    eager.set_attn_implementation({"vision_config": "eager", "text_config": "sdpa", "": "sdpa"})
    with torch.no_grad():
        image_output = pruned.get_image_features(pixel_values=pixel_values)
        attentions = eager.model.vision_tower(pixel_values, output_attentions=True).attentions
    cls_attention = attentions[-2][:, :, 0, 1:].mean(1)
    for scores, kept, budget in zip(cls_attention, image_output.kept_indices, image_output.token_budgets, strict=True):
        expected = torch.topk(scores, int(budget)).indices.sort().values
        assert torch.equal(kept, expected)


def test_uniform_selector_keeps_evenly_spaced_patches(small_checkpoint, pixel_values: torch.Tensor) -> None:
    pruned = load_pruned(small_checkpoint, energy_ratio=0.9, min_tokens=3, selector="uniform")
    with torch.no_grad():
        image_output = pruned.get_image_features(pixel_values=pixel_values)
    expected = evenly_spaced_mask(64, image_output.token_budgets)
    for kept, mask in zip(image_output.kept_indices, expected, strict=True):
        assert torch.equal(kept, mask.nonzero().squeeze(-1))


def test_plain_image_gets_a_smaller_budget_than_a_busy_one(llava15_checkpoint, llava15_images: dict) -> None:
    """At LLaVA-1.5 geometry (576 tokens): flat colour < a few shapes < dense noise."""
    processor = LlavaProcessor.from_pretrained(llava15_checkpoint)
    pruned = load_pruned(llava15_checkpoint, energy_ratio=0.9, min_tokens=1)
    names = ["plain", "shapes", "busy"]
    pixels = processor.image_processor([llava15_images[name] for name in names], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        plain, shapes, busy = pruned.get_image_features(pixel_values=pixels).token_budgets.tolist()
    assert plain < shapes < busy <= 576


def test_half_precision_model_prunes_with_float32_spectra(small_checkpoint, pixel_values: torch.Tensor) -> None:
    """A bfloat16 model gives budgets close to the float32 model's (its features differ only by rounding)."""
    full = load_pruned(small_checkpoint, energy_ratio=0.8, min_tokens=1)
    half = load_pruned(small_checkpoint, energy_ratio=0.8, min_tokens=1, dtype=torch.bfloat16)
    with torch.no_grad():
        full_output = full.get_image_features(pixel_values=pixel_values)
        half_output = half.get_image_features(pixel_values=pixel_values.bfloat16())
    assert half_output.pooler_output[0].dtype == torch.bfloat16
    difference = (half_output.token_budgets - full_output.token_budgets).abs()
    assert int(difference.max()) <= max(2, int(0.1 * full_output.token_budgets.max()))


def test_randomized_solver_matches_exact_when_the_rank_covers_the_budget(
    small_checkpoint, pixel_values: torch.Tensor
) -> None:
    exact = load_pruned(small_checkpoint, energy_ratio=0.8, min_tokens=1)
    randomized = load_pruned(
        small_checkpoint, energy_ratio=0.8, min_tokens=1, spectrum_solver="randomized", randomized_rank=64
    )
    with torch.no_grad():
        exact_budgets = exact.get_image_features(pixel_values=pixel_values).token_budgets
        randomized_budgets = randomized.get_image_features(pixel_values=pixel_values).token_budgets
    assert torch.equal(exact_budgets, randomized_budgets)


HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero", "cpu")


def record_host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patches every tensor method that reads values on the host; returns the list they append their names to."""
    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_budgets_and_selection_sync_with_the_host_once(solver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """prune_images reads device values on the host once per batch (budgets and finiteness flags together)."""
    from adaprune.configuration_adaprune import PruningSettings
    from adaprune.image_pruning import prune_images

    features = torch.randn(5, 64, 96)
    signals = {"cls_attention": torch.rand(5, 64)}
    reads = record_host_reads(monkeypatch)
    pruning = prune_images(features, signals, PruningSettings(spectrum_solver=solver, min_tokens=2))
    assert reads == ["tolist"]
    monkeypatch.undo()
    assert [len(kept) for kept in pruning.kept_indices] == pruning.token_budgets.tolist()


def test_groups_of_different_lengths_sync_with_the_host_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """prune_groups (LLaVA-NeXT units of several lengths) still reads the host once, and each group equals
    pruning it alone."""
    from adaprune.configuration_adaprune import PruningSettings
    from adaprune.image_pruning import UnitGroup, prune_groups, prune_images

    settings = PruningSettings(min_tokens=2, energy_ratio=0.8)
    groups = [
        UnitGroup(torch.randn(count, length, 48), {"cls_attention": torch.rand(count, length)}, images=[0] * count)
        for count, length in ((2, 40), (1, 77), (3, 12))
    ]
    reads = record_host_reads(monkeypatch)
    prunings = prune_groups(groups, settings)
    assert reads == ["tolist"]
    monkeypatch.undo()
    for group, pruning in zip(groups, prunings):
        alone = prune_images(group.spectrum_features, group.signals, settings)
        assert torch.equal(pruning.token_budgets, alone.token_budgets)
        assert all(torch.equal(a, b) for a, b in zip(pruning.kept_indices, alone.kept_indices))


def test_non_finite_unit_names_its_image() -> None:
    """A NaN in any unit of a group raises, naming the image the unit belongs to."""
    from adaprune.configuration_adaprune import PruningSettings
    from adaprune.image_pruning import UnitGroup, prune_groups

    broken = torch.randn(3, 20, 8)
    broken[1, 4, 2] = float("nan")
    groups = [UnitGroup(torch.randn(2, 30, 8), images=[0, 1]), UnitGroup(broken, images=[2, 5, 7])]
    with pytest.raises(ValueError, match=r"images \[5\] \(0-based, in batch order\) have non-finite visual features"):
        prune_groups(groups, PruningSettings(selector="uniform"))


@pytest.mark.parametrize("source", ["vision", "projected"])
def test_energy_curves_give_the_budgets_the_model_uses(source: str, small_checkpoint, pixel_values: torch.Tensor) -> None:
    """`image_energy_curves` (what calibration uses) yields each image's budget at any energy ratio."""
    from adaprune.spectral_budget import budgets_from_curves

    curves = load_pruned(small_checkpoint, spectrum_source=source).model.image_energy_curves(pixel_values)
    assert [len(units) for units in curves] == [1] * len(pixel_values)
    assert all(curve.shape == (64,) and curve.dtype == torch.float32 for units in curves for curve in units)
    for ratio in (0.3, 0.6, 0.9):
        model = load_pruned(small_checkpoint, spectrum_source=source, energy_ratio=ratio, min_tokens=2)
        with torch.no_grad():
            budgets = model.get_image_features(pixel_values=pixel_values).token_budgets
        stacked = torch.stack([units[0] for units in curves])
        assert budgets.tolist() == budgets_from_curves(stacked, ratio, min_tokens=2).tolist()
    assert len({tuple(units[0].tolist()) for units in curves}) == len(curves)
