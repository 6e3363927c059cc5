"""The `adaprune` command on a tiny LLaVA-NeXT checkpoint: convert, calibrate (τ checked by the model), inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.cli import assert_nontrivial_png, run_cli
from support.oracle import image_features, load_pruned

TARGET = 60.0


@pytest.fixture(scope="module")
def images_dir(next_images: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("next-cli-images")
    for name, image in next_images.items():
        image.save(directory / f"{name}.png")
    return directory


@pytest.fixture(scope="module")
def calibrated(next_checkpoint: Path, images_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Convert with per-crop budgets, then calibrate with --write-config."""
    root = tmp_path_factory.mktemp("next-cli")
    checkpoint, plots = root / "tiny-llava-next-adaprune", root / "plots"
    code, out, err = run_cli(["convert", next_checkpoint, checkpoint, "--min-tokens", 4, "--budget-scope", "crop"])
    assert code == 0, err
    code, out, err = run_cli(
        ["calibrate", checkpoint, images_dir, "--target-mean-tokens", TARGET, "--write-config", "--output-dir", plots]
    )
    assert code == 0, err
    return {"dir": checkpoint, "plots": plots, "out": out, "record": json.loads((plots / "calibration.json").read_text())}


def test_calibrated_tau_gives_the_target_mean_in_the_model(calibrated: dict, images_dir: Path, next_processor) -> None:
    config = json.loads((calibrated["dir"] / "config.json").read_text())
    assert config["model_type"] == "llava_next_adaprune" and config["budget_scope"] == "crop"
    assert config["energy_ratio"] == calibrated["record"]["statistics"]["energy_ratio"]
    model = load_pruned(calibrated["dir"])
    paths = sorted(images_dir.glob("*.png"))
    budgets = []
    for path in paths:
        inputs = next_processor.image_processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            budgets.append(int(image_features(model, inputs).token_budgets[0]))
    assert abs(sum(budgets) / len(budgets) - TARGET) <= 1
    assert budgets == [calibrated["record"]["budgets"][path.name] for path in paths]
    assert len(set(budgets)) > 2
    for name in ("budget_histogram.png", "energy_curves.png", "kept_patches.png"):
        assert_nontrivial_png(calibrated["plots"] / name)


def test_inspect_draws_kept_patches_and_compares_answers(calibrated: dict, images_dir: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(
        ["inspect", calibrated["dir"], images_dir / "large.png", "--max-new-tokens", 2, "--repeats", 1, "--output-dir", tmp_path]
    )
    assert code == 0, err
    budget = calibrated["record"]["budgets"]["large.png"]
    assert f"large.png: {budget} of 2016 visual tokens kept" in out  # 576 + 30 grid rows of 48 (newlines excluded)
    assert "pruned" in out and "unpruned" in out
    overlays = list(tmp_path.glob("*.png"))
    assert len(overlays) == 1
    assert_nontrivial_png(overlays[0])


def test_inspect_shows_the_tokens_adaptprune_keeps_per_crop(calibrated: dict, images_dir: Path, tmp_path: Path) -> None:
    """In-LLM selection on packed crops: with per-crop budgets of 7, the large image's five crops keep 35 tokens
    inside the language model, and inspect reports and draws those."""
    settings = ["--selector", "adaptprune", "--prune-layer", 1, "--budget-mode", "fixed", "--fixed-tokens", 7]
    code, out, err = run_cli(
        ["inspect", calibrated["dir"], images_dir / "large.png", "--max-new-tokens", 2, "--repeats", 1,
         "--output-dir", tmp_path, *settings]
    )
    assert code == 0, err
    assert "large.png: 35 of 2016 visual tokens kept" in out
    assert_nontrivial_png(tmp_path / "large_kept_patches.png")
