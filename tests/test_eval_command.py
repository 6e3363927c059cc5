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


def test_energy_budgets_are_calibrated_to_the_target_on_the_calibration_split(
    evaluated: tuple[dict, Path, str],
) -> None:
    results, _, _ = evaluated
    for target in TARGETS:
        calibration = results["calibrations"][f"energy@{target}"]
        assert abs(calibration["mean"] - target) <= 1 and calibration["n_images"] == 120
        energy = [entry for entry in results["variants"] if entry["rule"] == "energy" and entry["target"] == target]
        assert {entry["settings"]["energy_ratio"] for entry in energy} == {calibration["energy_ratio"]}
        assert all(entry["kept_tokens"]["std"] > 0 for entry in energy)  # budgets differ between images


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
    # a rule that declares no way to meet a target is reported and left out, never run at the wrong budget
    assert "toy_halving" not in {variant.rule for variant in variants}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--questions", "0"], "argument --questions: expected a whole number >= 1, got '0'"),
        (["--targets", "-4"], "argument --targets: expected a number > 0, got '-4'"),
        (["/no/such/dir"], "MODEL '/no/such/dir' does not exist"),
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
