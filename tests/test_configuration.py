"""`AdaPruneConfig` settings and validation, and the model-free `image_pruning.prune_images` step."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import LlavaConfig

import adaprune  # noqa: F401 - registers the pruning config with AutoConfig
from adaprune import AdaPruneConfig, AnyResPruningSettings, PruningSettings
from adaprune.image_pruning import prune_images
from adaprune.methods import BUDGET_RULES, SELECTORS
from adaprune.sequence_compaction import POSITION_POLICIES
from adaprune.spectral_budget import budgets_from_curves, energy_curves
from adaprune.token_selection import top_k_mask
from adaprune.tools.settings_docs import with_table

DOCUMENTED_DEFAULTS = {
    "enabled": True,
    "budget_mode": "energy",
    "energy_ratio": 0.9,
    "fixed_tokens": 64,
    "min_tokens": 16,
    "max_tokens": None,
    "spectrum_source": "vision",
    "center_spectrum": True,
    "spectrum_solver": "exact",
    "randomized_rank": 128,
    "randomized_oversampling": 16,
    "randomized_power_iterations": 2,
    "selector": "cls_attention",
    "vision_stage_selector": "none",
    "vision_stage_tokens": 288,
    "prune_layer": 2,
    "adaptprune_prior_sigma": 0.5,
    "adaptprune_radius": 5.0,
    "adaptprune_distance_sigma": 1.5,
    "adaptprune_similarity_sigma": 0.05,
    "autoprune_first_keep_ratio": 2.5,
    "autoprune_text_weight": 0.3,
    "autoprune_midpoint": 14.9,
    "autoprune_base_slope": 0.4,
    "autoprune_mi_gain": 0.2,
    "marginal_share": 0.01,
    "floor_fraction": 0.5,
    "blend_weight": 0.5,
    "position_policy": "compact",
}

NON_DEFAULT_SETTINGS = {
    "enabled": False,
    "budget_mode": "fixed",
    "energy_ratio": 0.75,
    "fixed_tokens": 32,
    "min_tokens": 4,
    "max_tokens": 100,
    "spectrum_source": "projected",
    "center_spectrum": False,
    "spectrum_solver": "randomized",
    "randomized_rank": 40,
    "randomized_oversampling": 0,
    "randomized_power_iterations": 0,
    "selector": "fastv",
    "vision_stage_selector": "uniform",
    "vision_stage_tokens": 100,
    "prune_layer": 3,
    "adaptprune_prior_sigma": 0.25,
    "adaptprune_radius": 3.0,
    "adaptprune_distance_sigma": 1.0,
    "adaptprune_similarity_sigma": 0.1,
    "autoprune_first_keep_ratio": 3.0,
    "autoprune_text_weight": 0.5,
    "autoprune_midpoint": 10.0,
    "autoprune_base_slope": 0.3,
    "autoprune_mi_gain": 0.1,
    "marginal_share": 0.05,
    "floor_fraction": 0.25,
    "blend_weight": 0.75,
    "position_policy": "original",
}

INTEGER_AT_LEAST_ONE = "an integer >= 1"
BOOLEAN = "True or False"
BAD_VALUES = [
    *[("energy_ratio", value, "a number in (0, 1]") for value in (0, -0.1, 1.5, "0.5", True)],
    *[("min_tokens", value, INTEGER_AT_LEAST_ONE) for value in (0, 2.5)],
    *[("marginal_share", value, "a number in (0, 1]") for value in (0, 1.01, "0.1")],
    *[("floor_fraction", value, "a number in (0, 1]") for value in (0, -1)],
    *[("blend_weight", value, "a number in [0, 1]") for value in (-0.5, 2, None)],
    ("max_tokens", 3, "None or an integer >= min_tokens (16)"),
    ("budget_mode", "x", f"one of {list(BUDGET_RULES)}"),
    ("spectrum_solver", "svd", "one of ['exact', 'randomized']"),
    ("selector", "nope", f"one of {list(SELECTORS)}"),
    ("vision_stage_selector", "fastv", "one of ['none', 'cls_attention', 'uniform']"),
    ("vision_stage_tokens", 0, INTEGER_AT_LEAST_ONE),
    ("prune_layer", 0, INTEGER_AT_LEAST_ONE),
    ("adaptprune_radius", 0, "a number > 0"),
    ("adaptprune_similarity_sigma", -0.1, "a number > 0"),
    ("autoprune_first_keep_ratio", 0, "a number > 0"),
    ("autoprune_midpoint", "14.9", "a number"),
    ("position_policy", "x", f"one of {list(POSITION_POLICIES)}"),
    ("enabled", "yes", BOOLEAN),
    ("randomized_rank", 0, INTEGER_AT_LEAST_ONE),
    ("randomized_oversampling", -1, "an integer >= 0"),
    ("randomized_power_iterations", 1.0, "an integer >= 0"),
    ("fixed_tokens", 0, INTEGER_AT_LEAST_ONE),
    ("spectrum_source", "x", "one of ['vision', 'projected']"),
    ("center_spectrum", 1, BOOLEAN),
]


def settings_message(field: str, value: Any, allowed: str) -> str:
    """The pattern of the error for a bad setting: it names the field, the allowed values and the bad value."""
    return re.escape(f"{field} must be {allowed}, got {value!r}")


def pruning_of(config: Any) -> dict[str, Any]:
    """The pruning fields of a config, by name."""
    return {name: getattr(config, name) for name in PruningSettings.field_names()}


def test_defaults() -> None:
    """A fresh config carries the documented defaults, as attributes and as validated settings."""
    config = AdaPruneConfig()
    assert config.model_type == "llava_adaprune"
    assert isinstance(config, LlavaConfig)
    assert pruning_of(config) == DOCUMENTED_DEFAULTS
    assert config.pruning == PruningSettings(**DOCUMENTED_DEFAULTS) == PruningSettings()


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_VALUES)
def test_bad_settings_raise_naming_the_field_and_allowed_values(field: str, value: Any, allowed: str) -> None:
    """Each bad value fails in the config and in PruningSettings."""
    with pytest.raises(ValueError, match=settings_message(field, value, allowed)):
        AdaPruneConfig(**{field: value})
    with pytest.raises(ValueError, match=settings_message(field, value, allowed)):
        PruningSettings(**{field: value})


def test_max_tokens_below_a_custom_min_tokens_names_that_minimum() -> None:
    """The max_tokens error quotes the actual min_tokens."""
    with pytest.raises(ValueError, match=settings_message("max_tokens", 4, "None or an integer >= min_tokens (8)")):
        AdaPruneConfig(min_tokens=8, max_tokens=4)
    assert AdaPruneConfig(min_tokens=8, max_tokens=8).pruning.max_tokens == 8


def test_integer_energy_ratio_one_is_accepted() -> None:
    """energy_ratio=1 (an int) is a valid ratio."""
    assert AdaPruneConfig(energy_ratio=1).pruning.energy_ratio == 1


def test_pruning_revalidates_after_assignment() -> None:
    """`pruning` checks the current attributes, not the constructor's."""
    config = AdaPruneConfig()
    config.energy_ratio = 2.0
    with pytest.raises(ValueError, match=settings_message("energy_ratio", 2.0, "a number in (0, 1]")):
        config.pruning  # noqa: B018


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    """Every non-default setting survives save_pretrained / from_pretrained, under model_type llava_adaprune."""
    AdaPruneConfig(**NON_DEFAULT_SETTINGS).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava_adaprune"
    for loaded in (AdaPruneConfig.from_pretrained(tmp_path), transformers.AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is AdaPruneConfig
        assert loaded.model_type == "llava_adaprune"
        assert pruning_of(loaded) == NON_DEFAULT_SETTINGS
        assert loaded.pruning == PruningSettings(**NON_DEFAULT_SETTINGS)


def test_loads_a_stock_llava_config_with_overrides(tmp_path: Path) -> None:
    """A stock `LlavaConfig` directory loads as a pruning config; its LLaVA fields and the overrides are kept."""
    stock = LlavaConfig(image_token_id=77, vision_feature_layer=-3)
    stock.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava"
    config = AdaPruneConfig.from_pretrained(tmp_path, energy_ratio=0.7)
    assert type(config) is AdaPruneConfig
    assert config.model_type == "llava_adaprune"
    assert config.pruning == PruningSettings(energy_ratio=0.7)
    assert (config.image_token_id, config.vision_feature_layer) == (stock.image_token_id, stock.vision_feature_layer)
    assert config.text_config.to_dict() == stock.text_config.to_dict()
    assert config.vision_config.to_dict() == stock.vision_config.to_dict()


def test_bad_override_at_load_fails_on_use(tmp_path: Path) -> None:
    """Overrides set by from_pretrained are checked by `pruning`, like any other edit."""
    LlavaConfig().save_pretrained(tmp_path)
    config = AdaPruneConfig.from_pretrained(tmp_path, energy_ratio=2.0)
    with pytest.raises(ValueError, match=settings_message("energy_ratio", 2.0, "a number in (0, 1]")):
        config.pruning  # noqa: B018


def test_auto_config_for_model() -> None:
    """After `import adaprune`, AutoConfig builds the pruning config by model type."""
    config = transformers.AutoConfig.for_model("llava_adaprune", energy_ratio=0.5, selector="uniform")
    assert type(config) is AdaPruneConfig
    assert config.pruning == PruningSettings(energy_ratio=0.5, selector="uniform")


def image_batch(n_images: int = 3, n_tokens: int = 20, n_channels: int = 12) -> tuple[torch.Tensor, dict]:
    """Random features (n, N, d) and a [CLS] attention signal (n, N) from a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n_images, n_tokens, n_channels, generator=generator)
    return features, {"cls_attention": torch.rand(n_images, n_tokens, generator=generator)}


def assert_consistent(pruning: Any, features: torch.Tensor, vision_kept: list[int] | None = None) -> None:
    """Kept indices are ascending, one per budgeted token (or `vision_kept` per image, for an in-LLM selector),
    and kept_rows are exactly those feature rows."""
    expected = pruning.token_budgets.tolist() if vision_kept is None else vision_kept
    assert [len(indices) for indices in pruning.kept_indices] == expected
    rows = pruning.kept_rows(features)
    for image, indices in enumerate(pruning.kept_indices):
        assert (indices.diff() > 0).all()
        assert torch.equal(rows[image], features[image, indices])


@pytest.mark.parametrize("selector", sorted(SELECTORS))
@pytest.mark.parametrize("fixed_tokens", [1, 5, 20, 64])
def test_prune_images_fixed_budgets(fixed_tokens: int, selector: str) -> None:
    """budget_mode="fixed" gives every image fixed_tokens, clamped to its N tokens."""
    features, signals = image_batch()
    settings = PruningSettings(budget_mode="fixed", fixed_tokens=fixed_tokens, selector=selector)
    pruning = prune_images(features, signals, settings)
    n_images, n_tokens = features.shape[:2]
    assert pruning.token_budgets.tolist() == [min(fixed_tokens, n_tokens)] * n_images
    in_llm = SELECTORS[selector].stage == "language"
    assert_consistent(pruning, features, vision_kept=[n_tokens] * n_images if in_llm else None)


@pytest.mark.parametrize("fixed_tokens", [3, 8, 12])
def test_a_vision_stage_before_an_in_llm_selector_keeps_its_tokens_and_caps_the_budget(fixed_tokens: int) -> None:
    """With vision_stage_selector, the vision stage keeps vision_stage_tokens by its own selector, and the in-LLM
    selector's budget is at most that many."""
    features, signals = image_batch()
    settings = PruningSettings(
        budget_mode="fixed",
        fixed_tokens=fixed_tokens,
        selector="fastv",
        vision_stage_selector="cls_attention",
        vision_stage_tokens=8,
    )
    pruning = prune_images(features, signals, settings)
    assert pruning.token_budgets.tolist() == [min(fixed_tokens, 8)] * 3
    top_cls = signals["cls_attention"].argsort(dim=-1, descending=True)[:, :8].sort(dim=-1).values
    assert [indices.tolist() for indices in pruning.kept_indices] == top_cls.tolist()
    assert_consistent(pruning, features, vision_kept=[8] * 3)


def test_a_vision_stage_selector_needs_an_in_llm_selector() -> None:
    with pytest.raises(ValueError, match="vision_stage_selector='uniform' adds a vision stage to an in-LLM selector"):
        PruningSettings(selector="cls_attention", vision_stage_selector="uniform")


@pytest.mark.parametrize("energy_ratio", [0.3, 0.8, 1.0])
def test_prune_images_energy_budgets_keep_the_most_attended_tokens(energy_ratio: float) -> None:
    """budget_mode="energy": the spectral budgets, filled with the highest [CLS]-attention tokens."""
    features, signals = image_batch()
    settings = PruningSettings(energy_ratio=energy_ratio, min_tokens=2)
    pruning = prune_images(features, signals, settings)
    expected = budgets_from_curves(energy_curves(features), energy_ratio, min_tokens=2)
    assert torch.equal(pruning.token_budgets, expected)
    keep = top_k_mask(signals["cls_attention"], expected)
    assert [indices.tolist() for indices in pruning.kept_indices] == [row.nonzero().flatten().tolist() for row in keep]
    assert_consistent(pruning, features)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_prune_images_rejects_non_finite_features_naming_the_image(bad_value: float) -> None:
    """NaN/Inf in the spectrum or a checked tensor names the bad images."""
    features, signals = image_batch()
    settings = PruningSettings(budget_mode="fixed", fixed_tokens=4)
    broken = features.clone()
    broken[1, 3, 5] = bad_value
    with pytest.raises(ValueError, match=r"images \[1\] \(0-based"):
        prune_images(broken, signals, settings)
    projected = torch.randn(3, 20, 6)
    projected[0, 0, 0] = projected[2, 7, 1] = bad_value
    with pytest.raises(ValueError, match=r"images \[0, 2\] \(0-based"):
        prune_images(features, signals, settings, checked_features=(projected,))


def test_the_readme_settings_table_is_the_generated_one() -> None:
    """The README's settings table is generated from the declarations (python -m adaprune.tools.settings_docs)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert with_table(readme) == readme, "run: python -m adaprune.tools.settings_docs --write README.md"
    for name in AnyResPruningSettings.field_names():
        assert f"| `{name}` |" in readme
