"""Model cards and publishing of converted checkpoints.

The card (README.md) is rendered from `model_cards/model_card.md` with `huggingface_hub.ModelCard.from_template`,
from what the checkpoint directory holds: config.json (model type, pruning settings, `auto_map` code files), the
calibration record `adaprune_calibration.json` if `adaprune calibrate` wrote one for these settings, and the base
model and its licence, which `convert` passes in and later renders read back from the card's own front matter.
`publish_checkpoint` uploads a checkpoint with `huggingface_hub.HfApi` and pins the usage snippet to the commit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from huggingface_hub import HfApi, ModelCard, ModelCardData

from adaprune.configuration_adaprune import settings_class_for

T = TypeVar("T")

TEMPLATE_PATH = Path(__file__).with_name("model_cards") / "model_card.md"
CARD_FILE = "README.md"
CALIBRATION_FILE = "adaprune_calibration.json"
CARD_TAGS = ["llava", "adaprune", "e-adaprune", "visual-token-pruning", "token-pruning", "training-free"]
UNKNOWN_LICENSE = "other"
EXAMPLE_PROMPT = "USER: <image>\\nWhat is shown in this image? ASSISTANT:"


class PublishError(RuntimeError):
    """The checkpoint is not publishable, or the Hub refused or could not be reached."""


def first_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def read_config(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    return json.loads((checkpoint / "config.json").read_text())


def pruning_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The pruning settings stored in a config dict (those of its model type), defaults for missing ones (not
    validated)."""
    defaults = settings_class_for(config.get("model_type")).defaults()
    return {name: config.get(name, default) for name, default in defaults.items()}


def write_calibration_record(checkpoint: Path, record: dict[str, Any]) -> Path:
    """Stores a calibration record (statistics, the settings they hold for, images) next to the checkpoint."""
    path = checkpoint / CALIBRATION_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _calibration_for(checkpoint: Path, settings: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """The checkpoint's calibration record if it was made with `settings`, and whether a stale one exists."""
    path = checkpoint / CALIBRATION_FILE
    if not path.is_file():
        return None, False
    record = json.loads(path.read_text())
    if record.get("settings") != settings:
        return None, True
    return record, False


def code_files(checkpoint: Path) -> list[str]:
    """The remote-code files of a checkpoint (the .py files next to its config)."""
    return sorted(path.name for path in checkpoint.glob("*.py"))


def base_model_id(source: str) -> str | None:
    """The Hub id a source checkpoint stands for: the id itself, or the repo of a Hub cache snapshot directory."""
    path = Path(source)
    if not path.exists():
        return source
    match = re.search(r"models--([^/]+)--([^/]+)/snapshots/", path.resolve().as_posix() + "/")
    return f"{match[1]}/{match[2]}" if match else None


def base_model_license(source: str) -> tuple[str | None, str]:
    """The licence in the source checkpoint's card (a local README.md, or the Hub card of an id), and where it was
    looked for, for the user. None when there is no card, it names no licence, or the Hub cannot be reached."""
    path = Path(source)
    card_path = path / CARD_FILE if path.exists() else None
    if card_path is not None and not card_path.is_file():
        return None, f"{source} has no {CARD_FILE}"
    try:
        license = ModelCard.load(card_path or source).data.license
    except Exception as error:  # offline, missing repo, malformed card: all mean "unknown" here
        return None, f"could not read the model card of {source}: {first_line(error)}"
    where = f"the model card of {source}"
    return (license, f"from {where}") if license else (None, f"{where} names no license")


def _transformers_requirement() -> str:
    """adaprune's declared transformers range, e.g. '>=5.0,<6'."""
    for requirement in metadata.requires("adaprune") or []:
        match = re.fullmatch(r"transformers\s*([^;]*)", requirement.strip())
        if match:
            return match[1].strip()
    return ""


def existing_card_data(checkpoint: Path) -> ModelCardData | None:
    """The front matter of the checkpoint's current card, if it has one."""
    path = checkpoint / CARD_FILE
    return ModelCard.load(path).data if path.is_file() else None


def render_model_card(
    checkpoint: Path,
    *,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
) -> ModelCard:
    """The card for a converted checkpoint. A base model or licence not given is read from the existing card."""
    previous = existing_card_data(checkpoint)
    if previous is not None:
        base_model = base_model or previous.base_model
        license = license or previous.license
    config = read_config(checkpoint)
    settings = settings_class_for(config.get("model_type"))(**pruning_fields(config)).as_dict()
    calibration, stale = _calibration_for(checkpoint, settings)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        license=license or UNKNOWN_LICENSE,
        tags=CARD_TAGS,
    )
    name = repo_id.split("/")[-1] if repo_id else checkpoint.resolve().name
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=name,
        repo_id=repo_id,
        revision=revision,
        local_path=str(checkpoint),
        model_type=config["model_type"],
        code_files=code_files(checkpoint),
        example_prompt=EXAMPLE_PROMPT,
        settings=[
            (name, value, declaration.metadata["help"])
            for name, value in settings.items()
            for declaration, _ in [settings_class_for(config.get("model_type")).declared()[name]]
        ],
        calibration=calibration["statistics"] if calibration else None,
        calibration_images=calibration["images"] if calibration else None,
        stale_calibration=stale,
        calibration_file=CALIBRATION_FILE,
        adaprune_version=metadata.version("adaprune"),
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        transformers_requirement=_transformers_requirement(),
    )


def write_model_card(checkpoint: Path, **kwargs: Any) -> Path:
    """Renders the card (see `render_model_card`) into the checkpoint's README.md."""
    path = checkpoint / CARD_FILE
    render_model_card(checkpoint, **kwargs).save(path)
    return path


def check_publishable(checkpoint: Path) -> None:
    """Raises PublishError unless `checkpoint` is a converted checkpoint: config with auto_map, its code, weights."""
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise PublishError(
            f"CHECKPOINT {str(checkpoint)!r} has no config.json; pass a directory written by adaprune convert"
        )
    auto_map = read_config(checkpoint).get("auto_map")
    if not auto_map:
        raise PublishError(
            f"CHECKPOINT {str(checkpoint)!r} has no auto_map in config.json, so it would not load with "
            "trust_remote_code; convert it first with adaprune convert"
        )
    missing = sorted({entry.split(".")[0] + ".py" for entry in auto_map.values()} - set(code_files(checkpoint)))
    if missing:
        raise PublishError(f"CHECKPOINT {str(checkpoint)!r} lacks the code files {missing}; convert it again")
    if not any(checkpoint.glob("*.safetensors")):
        raise PublishError(f"CHECKPOINT {str(checkpoint)!r} has no .safetensors weights; convert it again")


def _on_hub(repo_id: str, call: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Runs one HfApi call for `repo_id`, turning any failure into a one-line PublishError."""
    try:
        return call(*args, **kwargs)
    except Exception as error:  # the Hub client raises many types (HTTP, offline, auth, validation)
        raise PublishError(f"uploading to {repo_id!r} failed: {first_line(error)}") from error


def publish_checkpoint(checkpoint: Path, repo_id: str, private: bool = False) -> str:
    """Uploads a converted checkpoint to the Hub and returns the commit id its card's usage snippet is pinned to.

    The folder goes up in one commit; then README.md is re-rendered with `revision=<that commit>` and uploaded alone
    (the pinned commit holds the same code and weights). The card is always rendered from the template, so hand
    edits to the local README.md are replaced; the local README.md ends up as the uploaded one.
    """
    check_publishable(checkpoint)
    api = HfApi()
    _on_hub(repo_id, api.create_repo, repo_id, private=private, exist_ok=True)
    write_model_card(checkpoint, repo_id=repo_id)
    commit = _on_hub(
        repo_id,
        api.upload_folder,
        repo_id=repo_id,
        folder_path=checkpoint,
        commit_message="Upload adaprune checkpoint (weights, code, processor, card)",
    )
    write_model_card(checkpoint, repo_id=repo_id, revision=commit.oid)
    _on_hub(
        repo_id,
        api.upload_file,
        path_or_fileobj=checkpoint / CARD_FILE,
        path_in_repo=CARD_FILE,
        repo_id=repo_id,
        commit_message=f"Model card: pin the usage snippet to {commit.oid[:12]}",
    )
    return commit.oid
