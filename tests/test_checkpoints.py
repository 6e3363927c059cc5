"""Checkpoint loading and Hub remote code.

* Stock llava-hf checkpoints use the transformers-4 weight names; the pruning class must load them (and checkpoints
  in the transformers-5 layout) completely, with exactly the tensors stock LLaVA loads.
* `save_pretrained` of the pruning model writes a remote-code checkpoint (model type, `auto_map`, every code file).
* In a fresh process that cannot import `adaprune`, `trust_remote_code=True` loads the pruning class from the saved
  code, with the saved settings and weights, and generates exactly what the package does; without it, loading
  fails loudly instead of returning an unpruned stock model. A re-save from remote code works the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from support.oracle import load_pruned
from support.remote_code import (
    REMOTE_CODE_FILES,
    outside_imports,
    relative_imports,
    run_isolated,
    state_checksum,
)
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

import adaprune
from adaprune import AdaPruneConfig, AdaPruneLlavaForConditionalGeneration
from adaprune.tools.tiny_llava import SMALL_GEOMETRY, sample_images
from adaprune.tools.tiny_llava_next import aspect_ratio_images

SETTINGS: dict[str, Any] = {"energy_ratio": 0.8, "min_tokens": 4, "position_policy": "original"}
MODEL_TYPE = "llava_adaprune"
CLASS_NAME = "AdaPruneLlavaForConditionalGeneration"
AUTO_MAP = {
    "AutoConfig": "configuration_adaprune.AdaPruneConfig",
    "AutoModelForImageTextToText": f"modeling_adaprune.{CLASS_NAME}",
}
LEGACY_PREFIXES = ("language_model.model.", "language_model.lm_head.", "vision_tower.", "multi_modal_projector.")
NEW_PREFIXES = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head.")
WEIGHTS = "model.safetensors"
IMAGE_NAMES = ("busy", "plain")
PROMPTS = (
    "USER: <image> describe this picture with many dots and lines ASSISTANT:",
    "USER: <image> what is in the image ? ASSISTANT:",
)
NEW_TOKENS = 5
PACKAGE_DIR = Path(adaprune.__file__).parent

def checkpoint_keys(directory: Path) -> list[str]:
    """The tensor names stored in a single-file safetensors checkpoint."""
    with safe_open(str(directory / WEIGHTS), framework="pt") as weights:
        return sorted(weights.keys())


def assert_layout(keys: list[str], prefixes: tuple[str, ...]) -> None:
    """Every key starts with one of `prefixes`, and every prefix is used."""
    assert keys
    assert [key for key in keys if not key.startswith(prefixes)] == []
    assert [prefix for prefix in prefixes if not any(key.startswith(prefix) for key in keys)] == []


def write_new_layout(source: Path, state_dict: dict[str, torch.Tensor], destination: Path) -> Path:
    """Copies `source` without its weights and stores `state_dict` under its own (transformers-5) names."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in state_dict.items()}
    save_file(tensors, str(destination / WEIGHTS), metadata={"format": "pt"})
    return destination


def assert_remote_code_checkpoint(directory: Path) -> None:
    """config.json declares the pruning model type, settings and auto_map; every code file needed is present."""
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE
    assert config["architectures"] == [CLASS_NAME]
    assert config["auto_map"] == AUTO_MAP
    assert {name: config[name] for name in SETTINGS} == SETTINGS
    pending = [entry.split(".")[0] for entry in AUTO_MAP.values()]
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        copied = directory / f"{module}.py"
        assert copied.is_file(), f"{module}.py is imported by the saved code but missing from {directory}"
        source = copied.read_text()
        assert source == (PACKAGE_DIR / f"{module}.py").read_text()
        pending.extend(relative_imports(source))
    assert {"modeling_adaprune", "configuration_adaprune"} < seen


def load_images(directory: Path) -> list[Image.Image]:
    """The sample images as saved for the subprocesses (PNG, lossless)."""
    return [Image.open(directory / f"{name}.png").convert("RGB") for name in IMAGE_NAMES]


@pytest.fixture(scope="module")
def pruned(small_checkpoint: Path) -> AdaPruneLlavaForConditionalGeneration:
    """The in-package pruning model on the stock checkpoint, with SETTINGS."""
    return load_pruned(small_checkpoint, **SETTINGS)


@pytest.fixture(scope="module")
def saved_dir(
    pruned: AdaPruneLlavaForConditionalGeneration,
    small_processor: LlavaProcessor,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The pruning model and the processor saved with `save_pretrained` (the directory one would push to the Hub)."""
    directory = tmp_path_factory.mktemp("saved") / "adaprune-tiny"
    pruned.save_pretrained(directory)
    small_processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def new_layout_checkpoint(
    small_checkpoint: Path, small_stock: LlavaForConditionalGeneration, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The stock checkpoint with its weights stored under transformers-5 names (`model.state_dict()` keys)."""
    return write_new_layout(small_checkpoint, small_stock.state_dict(), tmp_path_factory.mktemp("new") / "stock")


@pytest.fixture(scope="module")
def images_dir(small_images: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample images used for generation, as PNG files both processes read."""
    directory = tmp_path_factory.mktemp("images")
    for name in IMAGE_NAMES:
        small_images[name].save(directory / f"{name}.png")
    return directory


@pytest.fixture(scope="module")
def parent_run(
    pruned: AdaPruneLlavaForConditionalGeneration,
    small_stock: LlavaForConditionalGeneration,
    small_processor: LlavaProcessor,
    images_dir: Path,
) -> dict[str, Any]:
    """What the in-package pruning model gives on the shared inputs (inputs, greedy tokens, budgets, checksum),
    and the checksum of the stock model's weights."""
    inputs = small_processor(images=load_images(images_dir), text=list(PROMPTS), padding=True, return_tensors="pt")
    with torch.no_grad():
        sequences = pruned.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        budgets = pruned.get_image_features(pixel_values=inputs["pixel_values"]).token_budgets
    return {
        "input_ids": inputs["input_ids"].tolist(),
        "sequences": sequences.tolist(),
        "budgets": budgets.tolist(),
        "checksum": state_checksum(pruned),
        "stock_checksum": state_checksum(small_stock),
    }


REMOTE_BODY = """
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

try:
    import adaprune  # noqa: F401
    blocked = False
except ImportError:
    blocked = True

processor = AutoProcessor.from_pretrained(PARAMS["out"])
images = [Image.open(f"{PARAMS['images']}/{name}.png").convert("RGB") for name in PARAMS["image_names"]]
inputs = processor(images=images, text=PARAMS["prompts"], padding=True, return_tensors="pt")


def load(path):
    model, info = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
    return model.eval(), {key: sorted(map(str, value)) for key, value in info.items()}


def describe(model, info):
    with torch.no_grad():
        sequences = model.generate(**inputs, max_new_tokens=PARAMS["new_tokens"], do_sample=False)
        budgets = model.get_image_features(pixel_values=inputs["pixel_values"]).token_budgets
    return {
        "class": type(model).__name__,
        "module": type(model).__module__,
        "is_llava": isinstance(model, LlavaForConditionalGeneration),
        "model_type": model.config.model_type,
        "settings": {name: getattr(model.config, name) for name in PARAMS["settings"]},
        "loading_info": info,
        "sequences": sequences.tolist(),
        "budgets": budgets.tolist(),
        "checksum": state_checksum(model),
    }


model, info = load(PARAMS["out"])
remote = describe(model, info)
model.save_pretrained(PARAMS["resaved"])
new_layout = describe(*load(PARAMS["new_layout"]))
resaved = describe(*load(PARAMS["resaved"]))
emit({
    "blocked": blocked,
    "adaprune_modules": sorted(m for m in sys.modules if m == "adaprune" or m.startswith("adaprune.")),
    "processor_class": f"{type(processor).__module__}.{type(processor).__name__}",
    "input_ids": inputs["input_ids"].tolist(),
    "remote": remote,
    "new_layout": new_layout,
    "resaved": resaved,
})
"""


@pytest.fixture(scope="module")
def remote_paths(
    saved_dir: Path, pruned: AdaPruneLlavaForConditionalGeneration, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Where the remote-code subprocess reads and writes: the saved dir, a new-layout copy, the re-save target."""
    root = tmp_path_factory.mktemp("remote")
    return {
        "out": saved_dir,
        "new_layout": write_new_layout(saved_dir, pruned.state_dict(), root / "adaprune-tiny-new-layout"),
        "resaved": root / "adaprune-tiny-resaved",
        "workdir": root / "process",
    }


@pytest.fixture(scope="module")
def remote_run(remote_paths: dict[str, Path], images_dir: Path) -> dict[str, Any]:
    """One fresh process (adaprune blocked) loads the saved dir, its new-layout copy and a re-save with remote code."""
    params = {
        "out": str(remote_paths["out"]),
        "new_layout": str(remote_paths["new_layout"]),
        "resaved": str(remote_paths["resaved"]),
        "images": str(images_dir),
        "image_names": list(IMAGE_NAMES),
        "prompts": list(PROMPTS),
        "new_tokens": NEW_TOKENS,
        "settings": list(SETTINGS),
    }
    result = run_isolated(REMOTE_BODY, remote_paths["workdir"], params).result
    assert result is not None
    return result


def assert_same_model(loaded: dict[str, Any], parent: dict[str, Any], package_dir_name: str) -> None:
    """A remote-code load is the pruning class from the saved code, fully loaded, and behaves like the package."""
    assert loaded["class"] == CLASS_NAME
    assert loaded["module"].startswith(f"transformers_modules.{package_dir_name.replace('-', '_hyphen_')}.")
    assert loaded["module"].endswith(".modeling_adaprune")
    assert loaded["is_llava"]
    assert loaded["model_type"] == MODEL_TYPE
    assert loaded["settings"] == SETTINGS
    assert all(value == [] for value in loaded["loading_info"].values()), loaded["loading_info"]
    assert loaded["checksum"] == parent["checksum"] == parent["stock_checksum"]
    assert loaded["budgets"] == parent["budgets"]
    assert loaded["sequences"] == parent["sequences"]


@pytest.mark.parametrize("layout", ["legacy", "new"])
@pytest.mark.parametrize("model_class", [LlavaForConditionalGeneration, AdaPruneLlavaForConditionalGeneration])
def test_loads_every_weight_like_stock(
    layout: str,
    model_class: type[LlavaForConditionalGeneration],
    request: pytest.FixtureRequest,
    small_stock: LlavaForConditionalGeneration,
) -> None:
    """Both checkpoint layouts load with nothing missing or unexpected, into exactly the stock model's tensors."""
    directory = request.getfixturevalue("small_checkpoint" if layout == "legacy" else "new_layout_checkpoint")
    settings = SETTINGS if model_class is AdaPruneLlavaForConditionalGeneration else {}
    model, info = model_class.from_pretrained(directory, output_loading_info=True, **settings)
    assert type(model) is model_class
    assert info.keys() >= {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}
    assert {key: value for key, value in info.items() if len(value)} == {}
    loaded, stock = model.state_dict(), small_stock.state_dict()
    assert sorted(loaded) == sorted(stock)
    assert [name for name in stock if not torch.equal(loaded[name], stock[name])] == []


def test_settings_land_in_config(pruned: AdaPruneLlavaForConditionalGeneration) -> None:
    """Pruning settings passed to from_pretrained on a stock checkpoint become config fields of the pruning type."""
    assert isinstance(pruned.config, AdaPruneConfig)
    assert pruned.config.model_type == MODEL_TYPE
    assert {name: getattr(pruned.config, name) for name in SETTINGS} == SETTINGS
    assert {name: getattr(pruned.config.pruning, name) for name in SETTINGS} == SETTINGS


def test_checkpoint_layouts(
    small_checkpoint: Path, new_layout_checkpoint: Path, small_stock: LlavaForConditionalGeneration
) -> None:
    """The stock checkpoint really has transformers-4 names (so loading it tests the renames); the copy has new ones."""
    assert_layout(checkpoint_keys(small_checkpoint), LEGACY_PREFIXES)
    assert_layout(checkpoint_keys(new_layout_checkpoint), NEW_PREFIXES)
    assert checkpoint_keys(new_layout_checkpoint) == sorted(small_stock.state_dict())


def test_save_writes_remote_code_checkpoint(saved_dir: Path) -> None:
    """save_pretrained writes model type, settings, auto_map, all code files, and legacy-layout weights."""
    assert_remote_code_checkpoint(saved_dir)
    assert_layout(checkpoint_keys(saved_dir), LEGACY_PREFIXES)
    assert (saved_dir / "processor_config.json").is_file()


def test_parent_inputs_are_pruned(parent_run: dict[str, Any]) -> None:
    """The shared generation inputs really prune (else the remote comparison would not test pruning) and pad."""
    assert all(4 <= budget <= SMALL_GEOMETRY.tokens_per_image for budget in parent_run["budgets"])
    assert min(parent_run["budgets"]) < SMALL_GEOMETRY.tokens_per_image
    assert len(set(parent_run["budgets"])) > 1
    assert len({len(row) for row in parent_run["sequences"]}) == 1
    assert any(row[0] != row[-1] for row in parent_run["input_ids"])


def test_remote_process_cannot_import_adaprune(remote_run: dict[str, Any], parent_run: dict[str, Any]) -> None:
    """The subprocess ran without the package, and its stock processor built the same inputs as the parent's."""
    assert remote_run["blocked"] is True
    assert remote_run["adaprune_modules"] == []
    assert remote_run["processor_class"] == f"{LlavaProcessor.__module__}.LlavaProcessor"
    assert remote_run["input_ids"] == parent_run["input_ids"]


def test_remote_code_round_trip(
    remote_run: dict[str, Any], parent_run: dict[str, Any], remote_paths: dict[str, Path]
) -> None:
    """trust_remote_code loads the saved pruning class with its settings and (legacy-layout) weights; same tokens."""
    assert_same_model(remote_run["remote"], parent_run, remote_paths["out"].name)


def test_remote_code_loads_new_layout(
    remote_run: dict[str, Any], parent_run: dict[str, Any], remote_paths: dict[str, Path]
) -> None:
    """The saved code also loads a checkpoint whose weights use the transformers-5 names."""
    assert_layout(checkpoint_keys(remote_paths["new_layout"]), NEW_PREFIXES)
    assert_same_model(remote_run["new_layout"], parent_run, remote_paths["new_layout"].name)


def test_resave_from_remote_code(
    remote_run: dict[str, Any], parent_run: dict[str, Any], remote_paths: dict[str, Path]
) -> None:
    """A model loaded from remote code re-saves as a complete remote-code checkpoint that loads again."""
    assert_remote_code_checkpoint(remote_paths["resaved"])
    assert_same_model(remote_run["resaved"], parent_run, remote_paths["resaved"].name)


def test_without_trust_remote_code_fails_loudly(saved_dir: Path, tmp_path: Path) -> None:
    """Without the package and without trust_remote_code, loading raises instead of returning stock LLaVA."""
    body = """
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(PARAMS["out"])
    emit({"class": type(model).__name__, "module": type(model).__module__})
    """
    run = run_isolated(body, tmp_path, {"out": str(saved_dir)}, check=False)
    assert run.result is None, f"loaded {run.result} without trust_remote_code"
    assert run.returncode != 0
    assert "Traceback" in run.stderr
    assert "trust_remote_code=True" in run.stderr


def test_registered_classes_load_without_trust_remote_code(saved_dir: Path, parent_run: dict[str, Any]) -> None:
    """With adaprune imported, the Auto classes resolve the saved checkpoint to the package's own classes."""
    config = AutoConfig.from_pretrained(saved_dir)
    assert type(config) is AdaPruneConfig
    assert {name: getattr(config, name) for name in SETTINGS} == SETTINGS
    model = AutoModelForImageTextToText.from_pretrained(saved_dir)
    assert type(model) is AdaPruneLlavaForConditionalGeneration
    assert {name: getattr(model.config, name) for name in SETTINGS} == SETTINGS
    assert state_checksum(model) == parent_run["checksum"]


VERSION_CHECK_BODY = """
import warnings

import transformers

transformers.__version__ = PARAMS["version"]  # the range check reads the installed version at load time
from transformers import AutoModelForImageTextToText

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = AutoModelForImageTextToText.from_pretrained(PARAMS["out"], trust_remote_code=True)
emit({"class": type(model).__name__, "warnings": [str(w.message) for w in caught if "newer than" in str(w.message)]})
"""


def test_remote_code_on_an_older_transformers_fails_at_load_with_the_fix(saved_dir: Path, tmp_path: Path) -> None:
    """A checkpoint's code checks the user's transformers before defining anything: one message, the fix."""
    run = run_isolated(VERSION_CHECK_BODY, tmp_path, {"out": str(saved_dir), "version": "5.3.0"}, check=False)
    assert run.result is None and run.returncode != 0
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("ImportError: adaprune needs transformers>=")
    assert "transformers 5.3.0 is installed; run: pip install 'transformers>=" in error


def test_remote_code_on_a_newer_transformers_warns_once_and_loads(saved_dir: Path, tmp_path: Path) -> None:
    run = run_isolated(VERSION_CHECK_BODY, tmp_path, {"out": str(saved_dir), "version": "5.99.0"})
    assert run.result["class"] == CLASS_NAME
    assert len(run.result["warnings"]) == 1
    assert "transformers 5.99.0 is newer than the newest release adaprune was tested with" in run.result["warnings"][0]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_a_checkpoint_converted_by_version_0_1_prunes_as_it_did(family: str) -> None:
    """tests/data/v0.1-checkpoints holds tiny checkpoints converted by adaprune 0.1.0 (commit 0cf258e, before the
    method registry), with the budgets, kept indices and greedy tokens that version gave on two prompts; the
    current package loads them and gives exactly the same."""
    directory = Path(__file__).parent / "data" / "v0.1-checkpoints" / family
    expected = json.loads((directory / "expected.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    if family == "llava":
        images = [sample_images(SMALL_GEOMETRY.image_size)[name] for name in ("busy", "plain")]
    else:
        images = [aspect_ratio_images()[name] for name in ("wide", "tall")]
    inputs = processor(images=images, text=expected["prompts"], padding=True, return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes"))
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert features.token_budgets.tolist() == expected["token_budgets"]
    assert [kept.tolist() for kept in features.kept_indices] == expected["kept_indices"]
    assert tokens[:, inputs["input_ids"].shape[1] :].tolist() == expected["new_tokens"]


def test_the_remote_code_set_is_closed(saved_dir: Path) -> None:
    """A saved checkpoint carries exactly the remote-code modules, each importing only its siblings, the standard
    library, torch and transformers (with its own dependencies); the tooling is never copied. (The load in a
    process that cannot import adaprune is `test_remote_code_round_trip`.)"""
    copied = {path.name for path in saved_dir.glob("*.py")}
    assert copied == REMOTE_CODE_FILES
    assert {path.name for path in PACKAGE_DIR.glob("*.py")} - {"__init__.py", "__main__.py"} == REMOTE_CODE_FILES
    for name in sorted(copied):
        assert outside_imports((saved_dir / name).read_text()) == set(), name
