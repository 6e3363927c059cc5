"""The main job (README's first command): convert -> calibrate -> inspect, here on a local tiny checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support.cli import assert_nontrivial_png

from adaprune.tools.cli import main
from adaprune.tools.demo import BUILTIN_TARGET, demo_images, demo_scenes
from adaprune.tools.tiny_llava import SMALL_GEOMETRY

TARGET = 12


def test_demo_converts_calibrates_and_inspects(
    small_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [
        "demo",
        "--model",
        str(small_checkpoint),
        "--output-dir",
        str(tmp_path),
        "--target-mean-tokens",
        str(TARGET),
    ]
    assert main([*argv, "--min-tokens", "2", "--max-new-tokens", "2"]) == 0
    report = capsys.readouterr().out

    converted = tmp_path / "converted"
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llava_adaprune"
    assert "AutoModelForImageTextToText" in config["auto_map"]
    record = json.loads((tmp_path / "calibration.json").read_text())
    assert config["energy_ratio"] == record["statistics"]["energy_ratio"] and config["min_tokens"] == 2
    assert (converted / "adaprune_calibration.json").is_file() and (converted / "README.md").is_file()

    names = [f"{name}.png" for name in demo_images(SMALL_GEOMETRY.image_size)]
    rows = {match[1]: int(match[2]) for match in re.finditer(r"^  (\S+\.png) +(\d+) tokens$", report, re.MULTILINE)}
    assert rows == record["budgets"] and sorted(rows) == sorted(names)
    assert abs(sum(rows.values()) / len(rows) - TARGET) <= 1
    assert rows["plain.png"] < rows["noise-top-50pct.png"] < rows["busy.png"]

    plainest, busiest = min(rows, key=rows.get), max(rows, key=rows.get)
    inspected = re.findall(r"^== inspect (\S+)$", report, re.MULTILINE)
    assert inspected == [plainest, busiest]
    for name in inspected:
        assert f"{name}: {rows[name]} of {SMALL_GEOMETRY.tokens_per_image} visual tokens kept" in report
        assert (tmp_path / f"{Path(name).stem}_kept_patches.png").is_file()
    for picture in ("budget_histogram.png", "energy_curves.png", "kept_patches.png"):
        assert (tmp_path / picture).is_file()
    assert len(re.findall(r"^  (?:pruned|unpruned) +\d+ ms  '", report, re.MULTILINE)) == 4


def test_the_main_job_answers_its_scenes_on_the_built_in_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    scenes = demo_scenes()
    rows = re.findall(r"^  (\S+\.png) +(.+?) +(\S+) +(\S+(?: ✗)?) +(\S+(?: ✗)?)$", report, re.MULTILINE)
    assert [row[0] for row in rows] == list(scenes)
    for name, question, right, _, unpruned in rows:
        assert (question.strip(), right) == (scenes[name].question, scenes[name].answer)
        assert unpruned == right, f"{name}: {question} -> {unpruned}, not {right}"

    record = json.loads((tmp_path / "calibration.json").read_text())
    assert abs(record["statistics"]["mean"] - BUILTIN_TARGET) <= 1
    budgets = record["budgets"]
    assert max(budgets[name] for name in scenes if name.startswith("sparse")) < min(
        budgets[name] for name in scenes if name.startswith("dense")
    )
    inspected = re.findall(r"^== inspect (\S+)$", report, re.MULTILINE)
    assert inspected[0].startswith("sparse") and inspected[1].startswith("dense")
    for name in inspected:
        assert f"  right answer: {scenes[name].answer!r}" in report
        assert_nontrivial_png(tmp_path / f"{Path(name).stem}_kept_patches.png")
