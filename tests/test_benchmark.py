"""The benchmark command (`adaprune.tools.benchmark`) runs on a tiny setting and writes its results; its baselines are
what they claim to be. No timing is asserted: timings on a shared machine are not reproducible."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from support.oracle import load_pruned
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from adaprune.method_fixed import FixedBudget
from adaprune.methods import BUDGET_RULES, registered
from adaprune.tools.benchmark import _features_cut_to, _shortened_inputs, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    output_dir = tmp_path_factory.mktemp("bench")
    return main(["--quick", "--images", "2", "--output-dir", str(output_dir)]), output_dir


def test_quick_run_writes_json_with_every_measurement(quick_run: tuple[int, Path]) -> None:
    code, output_dir = quick_run
    assert code == 0
    results = json.loads((output_dir / "results.json").read_text())
    assert results["command"] == f"python -m adaprune.tools.benchmark --quick --images 2 --output-dir {output_dir}"
    assert results["machine"]["torch"] == torch.__version__

    rows = results["end_to_end"]["rows"]
    measured = {(row["batch_size"], row["variant"], row["target"]) for row in rows}
    variants = {(size, name, target) for size in (1, 2) for name in (*BUDGET_RULES, "ideal") for target in (8, 16)}
    in_llm = {
        (size, f"{rule}·{selector}", target)
        for size in (1, 2)
        for rule in BUDGET_RULES
        for selector in ("fastv", "adaptprune", "autoprune")
        for target in (8, 16)
    }
    assert measured == variants | in_llm | {(1, "stock", None), (2, "stock", None)}
    for row in rows:
        assert row["time_to_first_token_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["generate_s"] > 0
        assert row["time_to_first_token_s"] < row["generate_s"]
        if row["variant"] == "stock":
            assert row["mean_kept"] == 64
        if row["variant"] == "fixed":
            assert row["min_kept"] == row["max_kept"] == row["target"]
    by_key = {(row["batch_size"], row["variant"], row["target"]): row for row in rows}
    for size, _, target in variants:
        # The ideal runs the energy budgets, on the same padded lengths.
        for field in ("mean_kept", "min_kept", "max_kept", "padding_fraction", "kv_cache_bytes"):
            assert by_key[(size, "ideal", target)][field] == by_key[(size, "energy", target)][field]
    n_layers = len(by_key[(1, "stock", None)]["kv_cache_bytes_per_layer"])
    for size, name, target in in_llm:
        # the same budgets, chosen inside the language model: the layers below the first cut cache every visual
        # token; FastV and AdaptPrune cut once at K = 2 to the budget, AutoPrune after every layer on a schedule
        row = by_key[(size, name, target)]
        rule, selector = name.split("·")
        stock, vision_stage = by_key[(size, "stock", None)], by_key[(size, rule, target)]
        assert row["mean_kept"] == vision_stage["mean_kept"]
        per_layer = row["kv_cache_bytes_per_layer"]
        assert per_layer[0] == stock["kv_cache_bytes_per_layer"][0] > per_layer[-1]
        assert all(deeper <= shallower for shallower, deeper in pairwise(per_layer))
        seen = row["visual_tokens_per_layer"]
        assert seen[0] == 64
        if selector == "autoprune":
            assert vision_stage["mean_kept"] < seen[1] <= min(64, 2.5 * vision_stage["mean_kept"])
        else:
            assert seen == [64] * 2 + [vision_stage["mean_kept"]] * (n_layers - 2)
            assert per_layer[2:] == vision_stage["kv_cache_bytes_per_layer"][2:]
        assert vision_stage["language_model_flops_per_prompt"] < row["language_model_flops_per_prompt"]
        assert row["language_model_flops_per_prompt"] < stock["language_model_flops_per_prompt"]
    for entry in results["end_to_end"]["calibration"].values():
        assert 0 < entry["energy_ratio"] <= 1 and len(entry["budgets"]) == 2
        assert entry["budgets"][0] < entry["budgets"][1], "the images should differ in density"
    assert by_key[(2, "stock", None)]["kv_cache_bytes"] > by_key[(2, "energy", 8)]["kv_cache_bytes"]

    timings = results["solvers"]["timings"]
    assert {(row["tokens"], row["solver"], row["batch"]) for row in timings} == {
        (tokens, solver, batch) for tokens in (64, 320) for solver in ("exact", "randomized") for batch in (1, 8)
    }
    assert {row["tokens"] for row in results["solvers"]["errors"]} == {64, 320}
    models = {row["model"] for row in results["cost_model"]["table"]}
    assert models == {"LLaVA-1.5-7B", "LLaVA-1.5-13B", "LLaVA-NeXT-8B"}


@pytest.mark.parametrize("name", ["end_to_end.png", "budget_solvers.png", "cost_model.png"])
def test_quick_run_writes_real_plots(quick_run: tuple[int, Path], name: str) -> None:
    path = quick_run[1] / name
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert min(pixels.shape[:2]) >= 300
    assert np.std(pixels[..., :3]) > 0.05, "the plot is (nearly) blank"


def test_quick_run_writes_markdown_with_tables_goals_and_plots(quick_run: tuple[int, Path]) -> None:
    report = (quick_run[1] / "results.md").read_text()
    for heading in (
        "## End to end",
        "### Batch 1",
        "### Batch 2",
        "## Budget computation alone",
        "## FLOPs and KV-cache model",
        "## Goals",
    ):
        assert heading in report
    assert "Command: `python -m adaprune.tools.benchmark --quick" in report
    assert "Quick run" in report
    assert report.count("| energy | 8 |") == 2
    for name in ("end_to_end.png", "budget_solvers.png", "cost_model.png"):
        assert f"]({name})" in report
    goals = report.split("## Goals")[1]
    assert goals.count("met (") == 4  # overhead at 2 batch sizes, prefill speedup, exact budget time


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--targets", "1000"], "--targets 1000 is outside [2, 64]"),
        (["--new-tokens", "1"], "--new-tokens must be at least 2"),
        (["--batch-sizes", "8", "--images", "4"], "--batch-sizes 8 is larger than --images 4"),
        (["--device", "tpu"], "--device must be 'cpu' or 'cuda'"),
    ],
)
def test_bad_settings_give_a_one_line_error(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--quick", "--output-dir", str(tmp_path / "out"), *argv]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--quick", "--output-dir", str(blocker)]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_non_positive_numbers_are_rejected_by_the_parser(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--repeats", "0"])
    assert exit_info.value.code == 2
    assert "argument --repeats: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_shortened_inputs_keep_the_text_and_the_budgeted_placeholders(small_processor: LlavaProcessor) -> None:
    images = [np.zeros((112, 112, 3), dtype=np.uint8)] * 2
    prompts = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> describe ASSISTANT:"]
    inputs = small_processor(images=images, text=prompts, padding=True, return_tensors="pt")
    image_token_id = small_processor.image_token_id
    pad_token_id = small_processor.tokenizer.pad_token_id
    short = _shortened_inputs(inputs, [3, 10], image_token_id, pad_token_id)

    assert torch.equal(short["pixel_values"], inputs["pixel_values"])
    for row, budget in enumerate([3, 10]):
        ids = short["input_ids"][row][short["attention_mask"][row].bool()]
        original = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        assert int((ids == image_token_id).sum()) == budget
        assert ids[ids != image_token_id].tolist() == original[original != image_token_id].tolist()
        assert short["attention_mask"][row].tolist() == sorted(short["attention_mask"][row].tolist())  # left padding
    assert short["attention_mask"].sum(-1).max() == short["input_ids"].shape[1]


def test_ideal_baseline_generates_what_the_pruned_model_does(
    small_checkpoint: Path, small_processor: LlavaProcessor, small_images: dict
) -> None:
    """The stock model fed the shortened prompt and the kept features computes what pruning computes: same tokens."""
    pruned = load_pruned(small_checkpoint, energy_ratio=0.9, min_tokens=2)
    stock = LlavaForConditionalGeneration.from_pretrained(small_checkpoint).eval()
    images = list(small_images.values())
    inputs = small_processor(
        images=images, text=["USER: <image> describe this picture ASSISTANT:"] * 4, padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        image_output = pruned.model.get_image_features(pixel_values=inputs["pixel_values"])
        expected = pruned.generate(**inputs, max_new_tokens=5, do_sample=False)
        budgets = image_output.token_budgets.tolist()
        assert len(set(budgets)) > 1
        short = _shortened_inputs(inputs, budgets, stock.config.image_token_id, stock.config.text_config.pad_token_id)
        with _features_cut_to(stock, image_output.kept_indices):
            ideal = stock.generate(**short, max_new_tokens=5, do_sample=False)
    assert "get_image_features" not in vars(stock.model)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(ideal[:, short["input_ids"].shape[1] :], expected[:, prompt_length:])


def test_console_command_records_itself(tmp_path: Path) -> None:
    """`adaprune bench` writes the command as typed into its results."""
    from adaprune.tools.cli import main as adaprune_main

    argv = ["bench", "--quick", "--images", "2", "--sections", "cost", "--output-dir", str(tmp_path)]
    assert adaprune_main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["command"] == "adaprune " + " ".join(argv)


class RenamedFixedBudget(FixedBudget):
    """A toy budget rule: the fixed budget under another name (its setting is the shared `fixed_tokens`)."""

    name: ClassVar[str] = "toy_fixed"


def test_the_benchmark_runs_every_registered_budget_rule(tmp_path: Path) -> None:
    """A budget rule registered by a test is benchmarked next to the built-in ones, at every target mean."""
    with registered(RenamedFixedBudget):
        assert main(["--quick", "--images", "2", "--batch-sizes", "1", "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["end_to_end"]["rows"]
    toy = {row["target"]: row["mean_kept"] for row in rows if row["variant"] == "toy_fixed"}
    assert toy == {8: 8.0, 16: 16.0}
