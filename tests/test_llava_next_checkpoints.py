"""LLaVA-NeXT checkpoints: a saved pruning checkpoint is Hub remote code that loads in a process without adaprune.

The subprocess cannot import `adaprune`; with `trust_remote_code=True` it must load the saved pruning class with
its settings (budget scope and newline policy included) and every weight, and generate exactly what the package
does on images of different aspect ratios.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from support.oracle import load_pruned
from support.remote_code import relative_imports, run_isolated, state_checksum
from transformers import AutoModelForImageTextToText, LlavaNextProcessor

from adaprune import AdaPruneLlavaNextForConditionalGeneration

SETTINGS: dict[str, Any] = {"energy_ratio": 0.85, "min_tokens": 4, "budget_scope": "crop", "newline_policy": "drop"}
CLASS_NAME = "AdaPruneLlavaNextForConditionalGeneration"
AUTO_MAP = {
    "AutoConfig": "configuration_adaprune.AdaPruneLlavaNextConfig",
    "AutoModelForImageTextToText": f"modeling_adaprune.{CLASS_NAME}",
}
IMAGE_NAMES = ("wide", "large")
PROMPTS = ("USER: <image> describe this picture ASSISTANT:", "USER: <image> what is in the image ? ASSISTANT:")
NEW_TOKENS = 4

REMOTE_BODY = """
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaNextForConditionalGeneration

processor = AutoProcessor.from_pretrained(PARAMS["out"], trust_remote_code=True)
images = [Image.open(f"{PARAMS['images']}/{name}.png").convert("RGB") for name in PARAMS["image_names"]]
inputs = processor(images=images, text=PARAMS["prompts"], padding=True, return_tensors="pt")
model, info = AutoModelForImageTextToText.from_pretrained(PARAMS["out"], trust_remote_code=True, output_loading_info=True)
model.eval()
with torch.no_grad():
    sequences = model.generate(**inputs, max_new_tokens=PARAMS["new_tokens"], do_sample=False)
    features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
emit({
    "adaprune_modules": sorted(m for m in sys.modules if m == "adaprune" or m.startswith("adaprune.")),
    "class": type(model).__name__,
    "module": type(model).__module__,
    "is_llava_next": isinstance(model, LlavaNextForConditionalGeneration),
    "settings": {name: getattr(model.config, name) for name in PARAMS["settings"]},
    "loading_info": {key: sorted(map(str, value)) for key, value in info.items()},
    "sequences": sequences.tolist(),
    "budgets": features.token_budgets.tolist(),
    "kept_indices": [kept.tolist() for kept in features.kept_indices],
    "checksum": state_checksum(model),
})
"""


@pytest.fixture(scope="module")
def pruned(next_checkpoint: Path) -> AdaPruneLlavaNextForConditionalGeneration:
    return load_pruned(next_checkpoint, **SETTINGS)


@pytest.fixture(scope="module")
def saved_dir(pruned, next_processor: LlavaNextProcessor, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("saved") / "adaprune-next-tiny"
    pruned.save_pretrained(directory)
    next_processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def images_dir(next_images: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("next-images")
    for name in IMAGE_NAMES:
        next_images[name].save(directory / f"{name}.png")
    return directory


def test_save_writes_remote_code_checkpoint(saved_dir: Path) -> None:
    """config.json has the pruning model type, settings and auto_map; the code it needs is next to it."""
    config = json.loads((saved_dir / "config.json").read_text())
    assert config["model_type"] == "llava_next_adaprune"
    assert config["architectures"] == [CLASS_NAME]
    assert config["auto_map"] == AUTO_MAP
    assert {name: config[name] for name in SETTINGS} == SETTINGS
    modeling = (saved_dir / "modeling_adaprune.py").read_text()
    assert "anyres_layout" in relative_imports(modeling)
    assert all((saved_dir / f"{module}.py").is_file() for module in relative_imports(modeling))


def test_remote_code_round_trip(saved_dir: Path, images_dir: Path, pruned, tmp_path: Path) -> None:
    """A process that cannot import adaprune loads the saved class and reproduces budgets, kept tokens and tokens."""
    processor = LlavaNextProcessor.from_pretrained(saved_dir)
    images = [Image.open(images_dir / f"{name}.png").convert("RGB") for name in IMAGE_NAMES]
    inputs = processor(images=images, text=list(PROMPTS), padding=True, return_tensors="pt")
    with torch.no_grad():
        sequences = pruned.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        features = pruned.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    assert min(len(kept) / total for kept, total in zip(features.kept_indices, features.tokens_per_image)) < 0.5

    params = {
        "out": str(saved_dir),
        "images": str(images_dir),
        "image_names": list(IMAGE_NAMES),
        "prompts": list(PROMPTS),
        "new_tokens": NEW_TOKENS,
        "settings": list(SETTINGS),
    }
    remote = run_isolated(REMOTE_BODY, tmp_path, params).result
    assert remote is not None
    assert remote["adaprune_modules"] == []
    assert remote["class"] == CLASS_NAME and remote["is_llava_next"]
    assert remote["module"].startswith("transformers_modules.") and remote["module"].endswith(".modeling_adaprune")
    assert remote["settings"] == SETTINGS
    assert all(value == [] for value in remote["loading_info"].values()), remote["loading_info"]
    assert remote["checksum"] == state_checksum(pruned)
    assert remote["budgets"] == features.token_budgets.tolist()
    assert remote["kept_indices"] == [kept.tolist() for kept in features.kept_indices]
    assert remote["sequences"] == sequences.tolist()


def test_registered_classes_load_without_trust_remote_code(saved_dir: Path, pruned) -> None:
    """With adaprune imported, the Auto classes resolve the saved checkpoint to the package's class."""
    model = AutoModelForImageTextToText.from_pretrained(saved_dir)
    assert type(model) is AdaPruneLlavaNextForConditionalGeneration
    assert {name: getattr(model.config, name) for name in SETTINGS} == SETTINGS
    assert state_checksum(model) == state_checksum(pruned)
