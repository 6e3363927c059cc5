"""The `adaprune` command on tiny local models and images: convert, calibrate, inspect, publish, errors.

The subcommands run in-process through `cli.main`; one subprocess checks the installed console command, and one
loads the converted, calibrated checkpoint with trust_remote_code in a process that cannot import adaprune.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from support.cli import assert_nontrivial_png, run_cli
from support.remote_code import REMOTE_CODE_FILES, run_isolated
from transformers import LlavaProcessor

from adaprune import AdaPruneLlavaForConditionalGeneration
from adaprune.tools.demo import demo_images
from adaprune.tools.model_card import CALIBRATION_FILE
from adaprune.tools.tiny_llava import SMALL_GEOMETRY
from adaprune.tools.workflow import DEFAULT_PROMPT, finally_kept, load_model, open_image, prompt_for

BASE_MODEL = "llava-hf/llava-1.5-7b-hf"
SOURCE_LICENSE = "llama2"
TARGET = 12.0
MIN_TOKENS = 2
SELECTOR = "uniform"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CODE_FILES = {*REMOTE_CODE_FILES}
CHECKPOINT_FILES = CODE_FILES | {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
PROGRESS_BAR = re.compile(r"\|.*\| *\d+/\d+ \[")  # tqdm's bars (model loading, energy curves) share stderr
PLOTS = ("budget_histogram.png", "energy_curves.png", "kept_patches.png")


def image_budgets(checkpoint: Path, image_paths: list[Path]) -> list[int]:
    """Budgets the pruning model loaded from `checkpoint` (its own config) gives the images."""
    model = AdaPruneLlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = LlavaProcessor.from_pretrained(checkpoint)
    images = [Image.open(path).convert("RGB") for path in image_paths]
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixel_values).token_budgets.tolist()


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's sample images (flat to dense) at the small geometry, as PNG files."""
    directory = tmp_path_factory.mktemp("cli-images")
    for name, image in demo_images(SMALL_GEOMETRY.image_size).items():
        image.save(directory / f"{name}.png")
    return directory


@pytest.fixture(scope="module")
def image_paths(images_dir: Path) -> list[Path]:
    return sorted(images_dir.glob("*.png"))


@pytest.fixture(scope="module")
def source_with_card(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stock tiny checkpoint with a model card naming a licence, as llava-hf checkpoints have."""
    directory = tmp_path_factory.mktemp("source") / "tiny-llava"
    shutil.copytree(small_checkpoint, directory)
    (directory / "README.md").write_text(f"---\nlicense: {SOURCE_LICENSE}\n---\n\n# tiny llava\n")
    return directory


@pytest.fixture(scope="module")
def converted(source_with_card: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """`adaprune convert` of the tiny checkpoint with two pruning settings: exit code, output, directory."""
    dest = tmp_path_factory.mktemp("converted") / "tiny-llava-adaprune"
    code, out, err = run_cli(
        [
            "convert",
            source_with_card,
            dest,
            "--min-tokens",
            MIN_TOKENS,
            "--selector",
            SELECTOR,
            "--base-model",
            BASE_MODEL,
        ]
    )
    return SimpleNamespace(code=code, out=out, err=err, dir=dest)


@pytest.fixture(scope="module")
def calibrated(
    converted: SimpleNamespace, images_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    """A copy of the converted checkpoint after `adaprune calibrate --write-config`, and the plots directory."""
    root = tmp_path_factory.mktemp("calibrated")
    checkpoint, plots = root / "tiny-llava-adaprune", root / "plots"
    shutil.copytree(converted.dir, checkpoint)
    code, out, err = run_cli(
        ["calibrate", checkpoint, images_dir, "--target-mean-tokens", TARGET, "--write-config", "--output-dir", plots]
    )
    record = json.loads((plots / "calibration.json").read_text()) if code == 0 else None
    return SimpleNamespace(code=code, out=out, err=err, dir=checkpoint, plots=plots, record=record)


def test_convert_writes_remote_code_checkpoint(converted: SimpleNamespace) -> None:
    assert converted.code == 0, converted.err
    assert {path.name for path in converted.dir.iterdir()} == CHECKPOINT_FILES
    config = json.loads((converted.dir / "config.json").read_text())
    assert config["model_type"] == "llava_adaprune"
    assert (
        config["auto_map"]["AutoModelForImageTextToText"] == "modeling_adaprune.AdaPruneLlavaForConditionalGeneration"
    )
    assert (config["min_tokens"], config["selector"]) == (MIN_TOKENS, SELECTOR)
    assert f"license: {SOURCE_LICENSE} (from the model card of" in converted.out


def test_model_card_front_matter_and_contents(converted: SimpleNamespace) -> None:
    card = ModelCard.load(converted.dir / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["base_model"] == BASE_MODEL
    assert data["license"] == SOURCE_LICENSE
    assert {"llava", "adaprune", "visual-token-pruning"} <= set(data["tags"])
    text = card.text
    assert "trust_remote_code=True" in text and 'revision = "<commit sha>"' in text
    assert f"| `min_tokens` | `{MIN_TOKENS}` |" in text and f"| `selector` | `{SELECTOR}` |" in text
    assert "No calibration was run" in text
    assert f"transformers {__import__('transformers').__version__}" in text


def test_calibrate_meets_the_target_as_the_model_computes_budgets(
    calibrated: SimpleNamespace, image_paths: list[Path]
) -> None:
    """Independent check: the model loaded with the written config gives budgets whose mean is the target."""
    assert calibrated.code == 0, calibrated.err
    config = json.loads((calibrated.dir / "config.json").read_text())
    tau = calibrated.record["statistics"]["energy_ratio"]
    assert config["energy_ratio"] == tau and 0 < tau < 1
    assert (config["min_tokens"], config["selector"]) == (MIN_TOKENS, SELECTOR)
    budgets = image_budgets(calibrated.dir, image_paths)
    assert abs(sum(budgets) / len(budgets) - TARGET) <= 1
    assert budgets == [calibrated.record["budgets"][path.name] for path in image_paths]
    assert len(set(budgets)) > 3, "the sample images should get clearly different budgets"


@pytest.mark.parametrize(("budget_mode", "setting", "shown"), [("marginal", "marginal_share", "`marginal_share`")])
def test_calibrate_sets_the_checkpoints_own_budget_rule(
    converted: SimpleNamespace,
    images_dir: Path,
    image_paths: list[Path],
    tmp_path: Path,
    budget_mode: str,
    setting: str,
    shown: str,
) -> None:
    """A checkpoint whose budget rule is not 'energy' gets its own setting calibrated and written, and its model
    card names that setting."""
    checkpoint = shutil.copytree(converted.dir, tmp_path / "checkpoint")
    argv = ["calibrate", checkpoint, images_dir, "--target-mean-tokens", TARGET, "--budget-mode", budget_mode]
    code, out, err = run_cli([*argv, "--write-config", "--output-dir", tmp_path / "plots"])
    assert code == 0, err
    config = json.loads((checkpoint / "config.json").read_text())
    stats = json.loads((tmp_path / "plots" / "calibration.json").read_text())["statistics"]
    assert (
        config["budget_mode"] == budget_mode and config[setting] == stats[setting] == stats[stats["calibrated_setting"]]
    )
    assert f"calibrated {setting} (lambda) = {stats[setting]} on 7 images" in out
    budgets = image_budgets(checkpoint, image_paths)
    assert abs(sum(budgets) / len(budgets) - TARGET) <= 1
    assert f"{shown} = {stats[setting]} was calibrated" in ModelCard.load(checkpoint / "README.md").text


def test_calibrate_reports_statistics_and_writes_plots(calibrated: SimpleNamespace) -> None:
    stats = calibrated.record["statistics"]
    assert stats["n_images"] == 7 and stats["target_mean_tokens"] == TARGET
    assert stats["min"] <= stats["p10"] <= stats["p50"] <= stats["p90"] <= stats["max"]
    assert f"calibrated energy_ratio (tau) = {stats['energy_ratio']} on 7 images" in calibrated.out
    assert re.search(
        rf"min {stats['min']}  p10 [\d.]+  p25 [\d.]+  median [\d.]+  p75 [\d.]+  p90 [\d.]+  max {stats['max']}",
        calibrated.out,
    )
    for name in PLOTS:
        assert_nontrivial_png(calibrated.plots / name)
    stored = json.loads((calibrated.dir / CALIBRATION_FILE).read_text())
    assert stored == calibrated.record
    card = ModelCard.load(calibrated.dir / "README.md")
    assert card.data.base_model == BASE_MODEL and card.data.license == SOURCE_LICENSE
    assert f"τ = {stats['energy_ratio']} was calibrated" in card.text
    assert f"| {stats['mean']:.1f} | {stats['min']} |" in card.text


def test_calibrate_stock_checkpoint_on_a_dataset(
    small_checkpoint: Path, image_paths: list[Path], calibrated: SimpleNamespace, tmp_path: Path
) -> None:
    """A stock MODEL and a saved dataset (rows in another order) give the same tau; the checkpoint is untouched."""
    rows = list(reversed(image_paths))
    dataset = datasets.Dataset.from_dict(
        {"caption": [path.stem for path in rows], "picture": [str(path) for path in rows]}
    ).cast_column("picture", datasets.Image())
    dataset.save_to_disk(tmp_path / "dataset")
    before = sorted(path.name for path in small_checkpoint.iterdir())
    code, out, err = run_cli(
        [
            "calibrate",
            small_checkpoint,
            tmp_path / "dataset",
            "--target-mean-tokens",
            TARGET,
            "--min-tokens",
            MIN_TOKENS,
            "--selector",
            SELECTOR,
            "--output-dir",
            tmp_path / "plots",
            "--examples",
            2,
        ]
    )
    assert code == 0, err
    record = json.loads((tmp_path / "plots" / "calibration.json").read_text())
    assert record["statistics"]["energy_ratio"] == calibrated.record["statistics"]["energy_ratio"]
    assert record["images"].endswith("(dataset column 'picture')")
    assert sorted(path.name for path in small_checkpoint.iterdir()) == before
    for name in PLOTS:
        assert_nontrivial_png(tmp_path / "plots" / name)


def test_calibrated_checkpoint_loads_with_remote_code_offline(
    calibrated: SimpleNamespace, image_paths: list[Path], tmp_path: Path
) -> None:
    """In a process that cannot import adaprune, trust_remote_code loads the calibrated settings and budgets."""
    body = """
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        import adaprune  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    model = AutoModelForImageTextToText.from_pretrained(PARAMS["dir"], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(PARAMS["dir"], trust_remote_code=True)
    images = [Image.open(path).convert("RGB") for path in PARAMS["images"]]
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        budgets = model.get_image_features(pixel_values=pixel_values).token_budgets.tolist()
    emit({
        "blocked": blocked,
        "module": type(model).__module__,
        "settings": [model.config.energy_ratio, model.config.min_tokens, model.config.selector],
        "budgets": budgets,
    })
    """
    params = {"dir": str(calibrated.dir), "images": [str(path) for path in image_paths]}
    result = run_isolated(body, tmp_path, params).result
    assert result is not None and result["blocked"] is True
    assert result["module"].startswith("transformers_modules.") and result["module"].endswith(".modeling_adaprune")
    assert result["settings"] == [calibrated.record["statistics"]["energy_ratio"], MIN_TOKENS, SELECTOR]
    assert result["budgets"] == [calibrated.record["budgets"][path.name] for path in image_paths]


def test_inspect_reports_budget_answers_and_prefill(
    calibrated: SimpleNamespace, image_paths: list[Path], tmp_path: Path
) -> None:
    busy = next(path for path in image_paths if path.stem == "busy")
    code, out, err = run_cli(
        [
            "inspect",
            calibrated.dir,
            busy,
            "--prompt",
            "what is in the image ?",
            "--max-new-tokens",
            3,
            "--repeats",
            1,
            "--output-dir",
            tmp_path,
        ]
    )
    assert code == 0, err
    budget = calibrated.record["budgets"]["busy.png"]
    tokens = SMALL_GEOMETRY.tokens_per_image
    assert f"busy.png: {budget} of {tokens} visual tokens kept ({budget / tokens:.1%})" in out
    rows = re.findall(r"^  (pruned|unpruned) +(\d+) ms  '(.*)'$", out, re.MULTILINE)
    assert [row[0] for row in rows] == ["pruned", "unpruned"]
    assert all(answer.split() for _, _, answer in rows)
    assert_nontrivial_png(tmp_path / "busy_kept_patches.png")


def test_inspect_shows_the_tokens_an_in_llm_selector_keeps(
    converted: SimpleNamespace, image_paths: list[Path], tmp_path: Path
) -> None:
    """With selector fastv the vision stage keeps every token; inspect reports (and draws) the budget the
    selector keeps inside the language model, the same tokens a forward reports for its layer."""
    busy = next(path for path in image_paths if path.stem == "busy")
    settings = ["--selector", "fastv", "--prune-layer", 1, "--budget-mode", "fixed", "--fixed-tokens", 7]
    code, out, err = run_cli(
        ["inspect", converted.dir, busy, "--max-new-tokens", 2, "--repeats", 1, "--output-dir", tmp_path, *settings]
    )
    assert code == 0, err
    assert f"busy.png: 7 of {SMALL_GEOMETRY.tokens_per_image} visual tokens kept" in out
    assert_nontrivial_png(tmp_path / "busy_kept_patches.png")

    overrides = {"selector": "fastv", "prune_layer": 1, "budget_mode": "fixed", "fixed_tokens": 7}
    loaded = load_model(str(converted.dir), overrides)
    inputs = loaded.processor(images=[open_image(busy)], text=["USER: <image> hi ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        vision_stage = loaded.model.get_image_features(pixel_values=inputs["pixel_values"])
        assert len(vision_stage.kept_indices[0]) == SMALL_GEOMETRY.tokens_per_image
        kept = finally_kept(loaded.model, inputs, vision_stage).kept_indices[0]
        expected = loaded.model(**inputs).kept_indices_by_layer[1][0]
    assert len(kept) == 7 and torch.equal(kept, expected)


def test_inspect_prints_and_draws_autoprunes_schedule(
    converted: SimpleNamespace, image_paths: list[Path], tmp_path: Path
) -> None:
    """AutoPrune prunes after every layer: inspect prints the image's schedule (tokens after each layer, mean
    the budget), what each layer sees and the mutual information, and draws the curve next to the kept patches."""
    busy = next(path for path in image_paths if path.stem == "busy")
    settings = ["--selector", "autoprune", "--budget-mode", "fixed", "--fixed-tokens", 8]
    code, out, err = run_cli(
        ["inspect", converted.dir, busy, "--max-new-tokens", 2, "--repeats", 1, "--output-dir", tmp_path, *settings]
    )
    assert code == 0, err
    loaded = load_model(str(converted.dir), {"selector": "autoprune", "budget_mode": "fixed", "fixed_tokens": 8})
    inputs = loaded.processor(
        images=[open_image(busy)], text=[prompt_for(loaded.processor, DEFAULT_PROMPT)], return_tensors="pt"
    )
    with torch.no_grad():
        output = loaded.model(**inputs)
    schedule = output.selector_report["tokens_per_layer"][0].tolist()
    seen = [SMALL_GEOMETRY.tokens_per_image, *schedule[:-1]]
    match = re.search(
        r"schedule, visual tokens after each decoder layer: \[(.*)\] \(mean (.*), budget 8\); "
        r"each layer sees \[(.*)\]; mutual information (.*) bits",
        out,
    )
    assert match, out
    assert [int(value) for value in match[1].split(",")] == schedule and schedule[0] == 20
    assert abs(float(match[2]) - 8) <= 1
    assert [int(value) for value in match[3].split(",")] == seen
    assert float(match[4]) == pytest.approx(float(output.selector_report["mutual_information"][0]), abs=1e-3)
    assert_nontrivial_png(tmp_path / "busy_kept_patches.png")


class FakeHub:
    """Records what adaprune hands to huggingface_hub.HfApi, with a snapshot of the uploaded folder."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        hub = self

        def create_repo(api: HfApi, repo_id: str, **kwargs: Any) -> str:
            if fail:
                raise ConnectionError("could not reach huggingface.co\nsecond line")
            hub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api: HfApi, *, folder_path: Path, **kwargs: Any) -> SimpleNamespace:
            folder = Path(folder_path)
            files = {path.name: path for path in folder.iterdir() if path.is_file()}
            hub.calls.append(
                (
                    "upload_folder",
                    {
                        **kwargs,
                        "files": sorted(files),
                        "config": json.loads(files["config.json"].read_text()),
                        "readme": files["README.md"].read_text(),
                    },
                )
            )
            return SimpleNamespace(oid=COMMIT)

        def upload_file(api: HfApi, *, path_or_fileobj: Path, **kwargs: Any) -> SimpleNamespace:
            hub.calls.append(("upload_file", {**kwargs, "content": Path(path_or_fileobj).read_text()}))
            return SimpleNamespace(oid="f" * 40)

        for name, method in (
            ("create_repo", create_repo),
            ("upload_folder", upload_folder),
            ("upload_file", upload_file),
        ):
            monkeypatch.setattr(HfApi, name, method)


def assert_published(hub: FakeHub, repo_id: str, private: bool, expected_files: set[str]) -> str:
    """create_repo, then the whole folder, then the README pinned to the folder's commit; returns that README."""
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder", "upload_file"]
    (_, create), (_, folder), (_, readme) = hub.calls
    assert create == {"repo_id": repo_id, "private": private, "exist_ok": True}
    assert folder["repo_id"] == repo_id and set(folder["files"]) == expected_files
    assert folder["config"]["auto_map"] and folder["config"]["model_type"] == "llava_adaprune"
    assert f'repo = "{repo_id}"' in folder["readme"]
    assert readme["repo_id"] == repo_id and readme["path_in_repo"] == "README.md"
    assert f'revision = "{COMMIT}"' in readme["content"]
    return readme["content"]


def test_convert_push_to_hub(source_with_card: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub(monkeypatch)
    dest = tmp_path / "pushed"
    code, out, err = run_cli(["convert", source_with_card, dest, "--push-to-hub", "me/tiny-adaprune", "--private"])
    assert code == 0, err
    readme = assert_published(hub, "me/tiny-adaprune", True, CHECKPOINT_FILES)
    assert (dest / "README.md").read_text() == readme
    assert ModelCard.load(dest / "README.md").data.base_model is None  # a local source without --base-model
    assert f"pinned to revision {COMMIT}" in out


def test_publish_calibrated_checkpoint(
    calibrated: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub(monkeypatch)
    checkpoint = shutil.copytree(calibrated.dir, tmp_path / "to-publish")
    code, out, err = run_cli(["publish", checkpoint, "me/tiny-calibrated"])
    assert code == 0, err
    readme = assert_published(hub, "me/tiny-calibrated", False, CHECKPOINT_FILES | {CALIBRATION_FILE})
    card = ModelCard(readme)
    assert card.data.base_model == BASE_MODEL and card.data.license == SOURCE_LICENSE
    assert f"τ = {calibrated.record['statistics']['energy_ratio']} was calibrated" in card.text


def test_publish_hub_failure_is_one_line(
    calibrated: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeHub(monkeypatch, fail=True)
    checkpoint = shutil.copytree(calibrated.dir, tmp_path / "to-publish")
    code, out, err = run_cli(["publish", checkpoint, "me/x"])
    assert code == 2
    assert err == "adaprune: error: uploading to 'me/x' failed: ConnectionError: could not reach huggingface.co\n"


BAD_ARGUMENTS = [
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["convert", "{missing}", "{fresh}"], "SRC '{missing}' does not exist"),
    (["convert", "{images}", "{fresh}"], "is not a checkpoint directory (no config.json in it)"),
    (["convert", "{other_model}", "{fresh}"], "has model_type 'qwen2_vl'; adaprune supports"),
    (
        ["convert", "{stock}", "{fresh}", "--energy-ratio", "1.5"],
        "energy_ratio must be a number in (0, 1], got 1.5 (from --energy-ratio)",
    ),
    (["convert", "{stock}", "{fresh}", "--min-tokens", "many"], "argument --min-tokens: invalid int value: 'many'"),
    (
        ["convert", "{stock}", "{fresh}", "--selector", "best"],
        "selector must be one of ['cls_attention', 'uniform', 'fastv', 'adaptprune', 'autoprune'], got 'best'",
    ),
    (
        ["convert", "{stock}", "{fresh}", "--budget-scope", "crop"],
        "--budget-scope applies only to LLaVA-NeXT checkpoints, and '{stock}' has model_type 'llava'",
    ),
    (["convert", "{stock}", "{images}"], "DEST '{images}' exists and is not empty"),
    (["convert", "{stock}", "{fresh}", "--private"], "--private applies to --push-to-hub"),
    (["calibrate", "{converted}", "{images}"], "the following arguments are required: --target-mean-tokens"),
    (["calibrate", "{converted}", "{images}", "--target-mean-tokens", "-3"], "expected a number > 0, got '-3'"),
    (["calibrate", "{converted}", "{images}", "--target-mean-tokens", "500"], "target mean 500 tokens is out of reach"),
    (["calibrate", "{converted}", "{empty}", "--target-mean-tokens", "12"], "holds no image files"),
    (["calibrate", "{converted}", "{missing}", "--target-mean-tokens", "12"], "IMAGES '{missing}' is not a directory"),
    (
        ["calibrate", "{converted}", "{images}", "--target-mean-tokens", "12", "--image-column", "x"],
        "--image-column only applies",
    ),
    (
        ["calibrate", "{converted}", "{images}", "--target-mean-tokens", "12", "--budget-mode", "fixed"],
        "pass --budget-mode with one of ['energy', 'marginal', 'floor', 'blend']",
    ),
    (
        ["calibrate", "{stock}", "{images}", "--target-mean-tokens", "12", "--write-config"],
        "--write-config needs a converted checkpoint",
    ),
    (
        ["calibrate", "{converted}", "{broken_images}", "--target-mean-tokens", "12"],
        "cannot read image '{broken_images}/not-an-image.png'",
    ),
    (["inspect", "{converted}", "{missing}"], "image '{missing}' is not a file"),
    (
        ["inspect", "{converted}", "{images}/busy.png", "--repeats", "0"],
        "argument --repeats: expected a whole number >= 1",
    ),
    (["publish", "{stock}", "me/x"], "has no auto_map in config.json"),
    (["publish", "{missing}", "me/x"], "CHECKPOINT '{missing}' is not a directory"),
    (["demo", "--max-new-tokens", "0"], "argument --max-new-tokens: expected a whole number >= 1, got '0'"),
]


@pytest.fixture(scope="module")
def bad_paths(
    small_checkpoint: Path, converted: SimpleNamespace, images_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "not-an-image.png").write_text("plain text")
    (root / "other").mkdir()
    (root / "other" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    return {
        "stock": str(small_checkpoint),
        "converted": str(converted.dir),
        "images": str(images_dir),
        "empty": str(root / "empty"),
        "broken_images": str(root / "broken"),
        "other_model": str(root / "other"),
        "missing": str(root / "does-not-exist"),
        "fresh": str(root / "fresh-output"),
    }


@pytest.mark.parametrize(
    ("argv", "message"), BAD_ARGUMENTS, ids=[" ".join(argv[:1] + argv[-2:]) or "none" for argv, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_exit_nonzero_with_one_line(argv: list[str], message: str, bad_paths: dict[str, str]) -> None:
    code, out, err = run_cli([arg.format(**bad_paths) for arg in argv])
    assert code == 2
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith("adaprune: error: "), err
    assert message.format(**bad_paths) in lines[0]
    assert "Traceback" not in out + err
    assert not Path(bad_paths["fresh"]).exists()


@pytest.mark.parametrize("command", ["convert", "calibrate", "inspect", "publish", "demo"])
def test_every_subcommand_has_help(command: str) -> None:
    code, out, err = run_cli([command, "--help"])
    assert code == 0 and err == ""
    assert out.startswith(f"usage: adaprune {command} [-h]")


def test_console_command_is_installed() -> None:
    """The `adaprune` console script declared in pyproject is installed and runs."""
    command = Path(sys.executable).with_name("adaprune")
    assert command.is_file(), "reinstall the package (bash scripts/setup.sh) to get the console script"
    completed = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: adaprune [-h] COMMAND")
    assert all(name in completed.stdout for name in ("convert", "calibrate", "inspect", "publish", "demo"))
