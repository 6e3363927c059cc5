"""Every registered pruning method, on both model families, through the same contract (`support.contract`); and a
method defined in the tests reaching the config, the command line and that contract with no other file touched."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from support.contract import Family, check_contract, check_remote_round_trip
from support.toy_methods import HalvingBudget

from adaprune import AdaPruneConfig, AdaPruneLlavaNextConfig
from adaprune.methods import BUDGET_RULES, SELECTORS, registered
from adaprune.settings import TokenSelector
from adaprune.tools.cli import build_parser, pruning_overrides
from adaprune.tools.settings_docs import settings_table

# Every selector with the paper's rule and the fixed one; every other budget rule with the first selector of each
# stage (a budget rule only hands the selector its budgets, whatever the selector does with them).
FIRST_OF_EACH_STAGE = list({method.stage: name for name, method in reversed(SELECTORS.items())}.values())
METHOD_CHOICES = [
    {"budget_mode": budget_mode, "selector": selector}
    for budget_mode in BUDGET_RULES
    for selector in (SELECTORS if budget_mode in ("energy", "fixed") else FIRST_OF_EACH_STAGE)
]


# Per family: the conftest fixtures of its checkpoint, stock model, processor and images; which images; and
# settings that keep every method's budgets sensible on the tiny images.
FAMILIES = {
    "llava": (
        ("small_checkpoint", "small_stock", "small_processor", "small_images"),
        ("busy", "shapes", "plain"),
        {"energy_ratio": 0.9, "min_tokens": 2, "fixed_tokens": 12, "prune_layer": 1},
    ),
    "llava_next": (
        ("next_checkpoint", "next_stock", "next_processor", "next_images"),
        ("large", "wide", "tall"),
        {"energy_ratio": 0.8, "min_tokens": 4, "fixed_tokens": 20, "prune_layer": 1},
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    """A model family: its tiny stock checkpoint, model, processor and images."""
    fixtures, image_names, settings = FAMILIES[request.param]
    checkpoint, stock, processor, images = (request.getfixturevalue(name) for name in fixtures)
    return Family(request.param, checkpoint, stock, processor, [images[name] for name in image_names], settings)


@pytest.mark.parametrize("choice", METHOD_CHOICES, ids=lambda choice: "-".join(choice.values()))
def test_every_registered_method_meets_the_contract(family: Family, choice: dict) -> None:
    check_contract(family, choice)


def test_every_registered_method_round_trips_through_remote_code(family: Family, tmp_path: Path) -> None:
    check_remote_round_trip(family, METHOD_CHOICES, tmp_path)


@dataclass(frozen=True)
class LastTokensSelector(TokenSelector):
    """A toy selector: the last tokens of each unit in raster order."""

    name: ClassVar[str] = "toy_last"

    def keep_mask(self, signals: dict[str, torch.Tensor], budgets: torch.Tensor) -> torch.Tensor:
        n_tokens = signals["features"].shape[-2]
        return torch.arange(n_tokens, device=budgets.device) >= (n_tokens - budgets).unsqueeze(-1)


def test_a_method_defined_in_a_test_reaches_config_cli_docs_and_contract(family: Family, tmp_path: Path) -> None:
    with registered(HalvingBudget), registered(LastTokensSelector):
        for config_class in (AdaPruneConfig, AdaPruneLlavaNextConfig):
            config = config_class(budget_mode="toy_halving", selector="toy_last", toy_fraction=0.25)
            assert config.pruning.budget_rule == HalvingBudget(toy_fraction=0.25)
            assert config.pruning.token_selector == LastTokensSelector()
            assert config_class().toy_fraction == 0.5
            with pytest.raises(ValueError, match=r"toy_fraction must be a float in \(0, 1\], got 2"):
                config_class(toy_fraction=2)
        arguments = ["convert", "src", str(tmp_path / "out"), "--budget-mode", "toy_halving", "--toy-fraction", "0.3"]
        overrides = pruning_overrides(build_parser().parse_args(arguments))
        assert overrides == {"budget_mode": "toy_halving", "toy_fraction": 0.3}
        assert '`budget_mode="toy_halving"`' in settings_table()
        check_contract(family, {"budget_mode": "toy_halving", "selector": "toy_last", "toy_fraction": 0.25})
    assert "toy_halving" not in BUDGET_RULES and "toy_last" not in SELECTORS
    with pytest.raises(
        ValueError, match=re.escape(f"budget_mode must be one of {list(BUDGET_RULES)}, got 'toy_halving'")
    ):
        AdaPruneConfig(budget_mode="toy_halving")
