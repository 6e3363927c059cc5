"""`adaprune eval`: every registered (budget rule, selector) at every target mean, calibrated on the calibration
split; reports, comparisons and plot written; registry additions evaluated without new code; bad arguments."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from support.cli import assert_nontrivial_png, run_cli
from support.toy_methods import HalvingBudget

from adaprune.methods import BUDGET_RULES, SELECTORS, registered
from adaprune.settings import BudgetRule, setting
from adaprune.tools import synthetic_vqa
from adaprune.tools.builtin_llava import builtin_checkpoint
from adaprune.tools.calibration import UnitCurves
from adaprune.tools.evaluation import matched_variants, questions_image_set, run_variant
from adaprune.tools.workflow import collect_energy_curves, load_model

TARGETS = (8, 16)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    output = tmp_path_factory.mktemp("eval")
    argv = ["eval", "--questions", 40, "--calibration-questions", 120, "--targets", *TARGETS, "--output-dir", output]
    code, out, err = run_cli(argv)
    assert code == 0, err
    return json.loads((output / "results.json").read_text()), output, out


def test_every_rule_and_selector_runs_at_every_target(evaluated: tuple[dict, Path, str]) -> None:
    results, _, _ = evaluated
    names = {(entry["name"], entry["target"]) for entry in results["variants"]}
    expected = {("all tokens", None)} | {
        (f"{rule} · {selector}", target) for rule in BUDGET_RULES for selector in SELECTORS for target in TARGETS
    }
    assert names == expected
    assert results["model"] == "the built-in model (adaprune/tools/builtin_llava)" and results["questions"] == 40
    for entry in results["variants"]:
        assert entry["n"] == 40 and 0 <= entry["low"] <= entry["accuracy"] <= entry["high"] <= 1
        assert sum(bucket["n"] for bucket in entry["by_density"].values()) == 40
        if entry["rule"] == "fixed":
            assert entry["kept_tokens"] == {
                "mean": entry["target"],
                "std": 0.0,
                "min": entry["target"],
                "max": entry["target"],
            }
        if entry["rule"] is None:
            assert entry["kept_tokens"]["mean"] == synthetic_vqa.GRID**2


def test_adaptive_budgets_are_calibrated_to_the_target_on_the_calibration_split(
    evaluated: tuple[dict, Path, str],
) -> None:
    results, _, _ = evaluated
    calibrated = [rule for rule in BUDGET_RULES.values() if rule.calibrated_setting is not None]
    assert len(calibrated) >= 4
    for rule in calibrated:
        for target in TARGETS:
            calibration = results["calibrations"][f"{rule.name}@{target}"]
            assert abs(calibration["mean"] - target) <= 1 and calibration["n_images"] == 120
            variants = [
                entry for entry in results["variants"] if entry["rule"] == rule.name and entry["target"] == target
            ]
            setting = rule.calibrated_setting
            assert {entry["settings"][setting] for entry in variants} == {calibration[setting]}
            assert all(entry["kept_tokens"]["std"] > 0 for entry in variants)  # budgets differ between images


def test_each_variant_is_compared_with_the_fixed_budget_of_its_selector_and_the_uniform_one(
    evaluated: tuple[dict, Path, str],
) -> None:
    results, _, _ = evaluated
    compared = results["comparisons"]
    assert set(compared["energy · cls_attention @ 8"]) == {"fixed · cls_attention", "fixed · uniform"}
    assert set(compared["fixed · cls_attention @ 8"]) == {"fixed · uniform"}
    assert compared["fixed · uniform @ 16"] == {}
    difference = compared["energy · uniform @ 16"]["fixed · uniform"]
    by_name = {(entry["name"], entry["target"]): entry["accuracy"] for entry in results["variants"]}
    assert difference["difference"] == pytest.approx(
        by_name[("energy · uniform", 16)] - by_name[("fixed · uniform", 16)]
    )
    buckets = difference["by_density"]
    assert sum(bucket["n"] for bucket in buckets.values()) == 40
    assert sum(bucket["difference"] * bucket["n"] for bucket in buckets.values()) / 40 == pytest.approx(
        difference["difference"]
    )


def test_the_report_compares_every_rule_with_fixed_and_the_default_per_bucket(
    evaluated: tuple[dict, Path, str],
) -> None:
    results, output, _ = evaluated
    report = (output / "results.md").read_text()
    adaptive = [name for name in BUDGET_RULES if name != "fixed"]
    assert f"| mean | selector | {' | '.join(adaptive)} |" in report
    for target in TARGETS:
        for selector in SELECTORS:
            assert f"| {target} | {selector} |" in report
    assert "Never below the fixed budget with confidence:" in report
    assert "### The default rule (`energy`) against the fixed budget, per density bucket" in report
    assert "| mean | selector | all | sparse | medium | dense |" in report
    entry = results["comparisons"]["marginal · cls_attention @ 8"]["fixed · cls_attention"]
    assert f"{100 * entry['difference']:+.1f} ({100 * entry['low']:+.1f} … {100 * entry['high']:+.1f})" in report


def test_the_report_table_and_plot_are_written(evaluated: tuple[dict, Path, str]) -> None:
    _, output, printed = evaluated
    report = (output / "results.md").read_text()
    assert report.startswith("Command: `adaprune eval --questions 40")
    for target in TARGETS:
        assert f"### Mean of {target} kept tokens per image" in report
    assert report.count("| energy · cls_attention |") == len(TARGETS)
    assert "![accuracy against mean kept tokens](accuracy.png)" in report
    assert_nontrivial_png(output / "accuracy.png")
    assert f"wrote {output / 'results.json'}" in printed


@dataclass(frozen=True)
class FirstImageTokens(BudgetRule):
    """A toy budget rule that meets a target directly: every image keeps `toy_tokens` tokens."""

    name: ClassVar[str] = "toy_tokens"
    target_setting: ClassVar[str] = "toy_tokens"

    toy_tokens: int = setting(4, "tokens every image keeps", minimum=1)

    def budgets(self, spectrum_features: torch.Tensor) -> torch.LongTensor:
        return torch.full((spectrum_features.shape[0],), self.toy_tokens, device=spectrum_features.device)


def test_a_registered_rule_is_evaluated_without_new_code() -> None:
    loaded = load_model(str(builtin_checkpoint()), {})
    questions = list(synthetic_vqa.samples("calibration", 8))
    curves = UnitCurves.from_images(collect_energy_curves(loaded, questions_image_set(questions), 8))
    with registered(FirstImageTokens), registered(HalvingBudget):
        variants, _ = matched_variants(curves, [8], 1, print)
        toy = [variant for variant in variants if variant.rule == "toy_tokens"]
        assert [variant.selector for variant in toy] == list(SELECTORS)
        run = run_variant(loaded.model, loaded.processor, toy[0], list(synthetic_vqa.samples("test", 4)), batch_size=4)
    assert run.kept_tokens == [8] * 4
    only, _ = matched_variants(curves, [8, 16], 1, print, budget_modes=["fixed", "marginal"], selectors=["uniform"])
    assert [(variant.name, variant.target) for variant in only] == [
        ("all tokens", None),
        *((f"{rule} · uniform", target) for target in (8, 16) for rule in ("fixed", "marginal")),
    ]
    # a rule that declares no way to meet a target is reported and left out, never run at the wrong budget
    assert "toy_halving" not in {variant.rule for variant in variants}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--questions", "0"], "argument --questions: expected a whole number >= 1, got '0'"),
        (["--targets", "-4"], "argument --targets: expected a number > 0, got '-4'"),
        (["/no/such/dir"], "MODEL '/no/such/dir' does not exist"),
        (["--budget-modes", "nope"], "argument --budget-modes: invalid choice: 'nope'"),
        (["--selectors", "energy"], "argument --selectors: invalid choice: 'energy'"),
    ],
)
def test_bad_arguments_end_with_one_line(argv: list[str], message: str) -> None:
    code, _, err = run_cli(["eval", *argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_document_without_results_markers_is_refused_before_evaluating(tmp_path: Path) -> None:
    document = tmp_path / "ACCURACY.md"
    document.write_text("# no markers here\n")
    code, out, err = run_cli(["eval", "--questions", 1, "--document", document])
    assert code == 2 and "has no results markers; add the line" in err and len(err.strip().splitlines()) == 1
    assert out == "" and document.read_text() == "# no markers here\n"
