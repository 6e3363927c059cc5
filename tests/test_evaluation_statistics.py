"""The statistics `adaprune eval` reports, on hand-made inputs with known answers."""

from __future__ import annotations

import math

import pytest

from adaprune.tools.evaluation import normalized, paired_difference, proportion, rules_against_fixed, spread


@pytest.mark.parametrize(
    ("correct", "total", "low", "high"),
    [
        (8, 10, 0.4901624, 0.9433178),  # Wilson score interval, z = 1.96: the textbook 8/10 example
        (0, 10, 0.0, 0.2775328),
        (10, 10, 0.7224672, 1.0),
        (500, 1000, 0.4690696, 0.5309304),  # 0.5 ± 1.96·sqrt(0.25/1000 + 1.96²/4e6) / (1 + 1.96²/1000)
    ],
)
def test_wilson_interval(correct: int, total: int, low: float, high: float) -> None:
    entry = proportion([True] * correct + [False] * (total - correct)).as_dict()
    assert entry["accuracy"] == correct / total
    assert entry["low"] == pytest.approx(low, abs=1e-6) and entry["high"] == pytest.approx(high, abs=1e-6)


def test_paired_difference_of_hand_made_answers() -> None:
    subject = [True, True, False, True]
    reference = [True, False, False, False]
    result = paired_difference(subject, reference)
    # differences 0, 1, 0, 1: mean 0.5, sample standard deviation sqrt(1/3), n = 4
    half = 1.959963984540054 * math.sqrt(1 / 3) / 2
    assert result["difference"] == 0.5
    assert result["low"] == pytest.approx(0.5 - half) and result["high"] == pytest.approx(0.5 + half)
    assert (result["only_subject"], result["only_reference"], result["n"]) == (2, 0, 4)


def test_identical_answers_differ_by_exactly_zero() -> None:
    answers = [True, False, True]
    assert paired_difference(answers, answers) | {"n": 0} == {
        "difference": 0.0,
        "low": 0.0,
        "high": 0.0,
        "only_subject": 0,
        "only_reference": 0,
        "n": 0,
    }


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="no answers to score"):
        proportion([])
    with pytest.raises(ValueError, match="equally long, non-empty lists; got 2 and 3"):
        paired_difference([True, False], [True, False, True])


def test_kept_token_spread() -> None:
    assert spread([2, 4, 4, 4, 5, 5, 7, 9]) == {"mean": 5.0, "std": 2.0, "min": 2.0, "max": 9.0}


@pytest.mark.parametrize(("raw", "expected"), [(" Red.", "red"), ("LEFT", "left"), ("3 ", "3"), ("yes .", "yes")])
def test_answers_are_normalised_before_matching(raw: str, expected: str) -> None:
    assert normalized(raw) == expected


def test_rules_against_fixed_counts_wins_and_losses_and_marks_missing_buckets() -> None:
    """Hand-made comparisons: a win, a loss and a tie; the default's buckets without questions show a dash."""

    def difference(low: float, high: float, **by_density: dict) -> dict:
        return {"difference": (low + high) / 2, "low": low, "high": high, "by_density": by_density}

    sparse_only = {"sparse": difference(-0.1, 0.1)}
    cells = {
        ("energy", 8): difference(0.01, 0.05, **sparse_only),
        ("energy", 16): difference(-0.02, 0.02, **sparse_only),
        ("marginal", 8): difference(-0.06, -0.01, **sparse_only),
        ("marginal", 16): difference(-0.02, 0.02, **sparse_only),
    }
    results = {
        "variants": [
            {"name": f"{rule} · uniform", "rule": rule, "selector": "uniform", "target": target}
            for rule, target in [*cells, ("fixed", 8), ("fixed", 16)]
        ],
        "comparisons": {
            f"{rule} · uniform @ {target}": {"fixed · uniform": value} for (rule, target), value in cells.items()
        },
    }
    report = "\n".join(rules_against_fixed(results))
    assert "`energy` 1 wins, 0 losses; `marginal` 0 wins, 1 losses" in report
    assert "Never below the fixed budget with confidence: `energy`." in report
    assert "| 8 | uniform | +3.0 (+1.0 … +5.0) ▲ | -3.5 (-6.0 … -1.0) ▼ |" in report
    assert "| 16 | uniform | +0.0 (-2.0 … +2.0) | +0.0 (-10.0 … +10.0) | — | — |" in report
