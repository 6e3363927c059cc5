"""The command-line workflow's operations: convert a checkpoint, calibrate tau, inspect one image.

Each operation takes plain arguments, prints a short report and writes its files; `cli.py` maps arguments onto
them and `demo.py` chains them. Bad input (paths, settings, images) raises `UsageError` with a one-line message that
names the value, what was expected and what to do.

Which classes load a checkpoint is decided by one table, `MODEL_FAMILIES`, keyed by the stock `model_type`; a
converted checkpoint (our own model type) is accepted wherever a stock one is.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm
from transformers import AutoProcessor, PretrainedConfig, PreTrainedModel, ProcessorMixin

from adaprune.anyres_layout import config_packed_layout, patch_boxes
from adaprune.configuration_adaprune import AdaPruneConfig, AdaPruneLlavaNextConfig, PruningSettings, settings_class_for
from adaprune.methods import BUDGET_RULES
from adaprune.modeling_adaprune import (
    AdaPruneImageFeaturesOutput,
    AdaPruneLlavaForConditionalGeneration,
    AdaPruneLlavaNextForConditionalGeneration,
)
from adaprune.spectral_rules import SpectralBudgetRule

from .calibration import Calibration, UnitCurves, calibrate
from .model_card import (
    base_model_id,
    base_model_license,
    first_line,
    pruning_fields,
    read_config,
    write_calibration_record,
    write_model_card,
)
from .plots import (
    Box,
    draw_kept_patches,
    save_budget_histogram,
    save_energy_curves,
    save_overlay_with_schedule,
    save_overlays,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
DEFAULT_PROMPT = "describe this picture"
OVERLAY_LONG_SIDE = 672  # pixels on the longer side of a LLaVA-NeXT overlay

# (model inputs, image index, pruned image features, model config, image processor) -> (picture, kept patch boxes)
KeptPatchView = Callable[
    [Mapping[str, torch.Tensor], int, AdaPruneImageFeaturesOutput, Any, Any], tuple[Image.Image, list[Box]]
]


class UsageError(Exception):
    """Bad input from the user: a one-line message naming the value, what was expected and what to do."""


def positive_int(value: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number


def positive_float(value: str) -> float:
    """argparse type: a number > 0."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
    return number


def processed_image(pixel_values: torch.Tensor, image_processor: Any) -> Image.Image:
    """The picture the vision tower saw: (3, H, W) normalized `pixel_values` back to 8-bit RGB."""
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    pixels = (pixel_values.float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def llava_kept_patches(
    inputs: Mapping[str, torch.Tensor],
    image_index: int,
    image_output: AdaPruneImageFeaturesOutput,
    config: Any,
    image_processor: Any,
) -> tuple[Image.Image, list[Box]]:
    """LLaVA: the processed image and one box per kept patch (raster order; a kept [CLS] token has no box)."""
    picture = processed_image(inputs["pixel_values"][image_index], image_processor)
    patch = config.vision_config.patch_size
    grid = picture.height // patch
    offset = image_output.tokens_per_image[image_index] - grid * grid  # 1 with the "full" strategy's [CLS]
    boxes = []
    for index in image_output.kept_indices[image_index].tolist():
        if index >= offset:
            row, col = divmod(index - offset, grid)
            boxes.append((col * patch, row * patch, (col + 1) * patch, (row + 1) * patch))
    return picture, boxes


def llava_next_kept_patches(
    inputs: Mapping[str, torch.Tensor],
    image_index: int,
    image_output: AdaPruneImageFeaturesOutput,
    config: Any,
    image_processor: Any,
) -> tuple[Image.Image, list[Box]]:
    """LLaVA-NeXT: the base crop stretched back to the image's aspect ratio (longer side `OVERLAY_LONG_SIDE`), and
    one box per kept visual token: coarse base-crop patches and fine grid patches (kept newlines have none)."""
    height, width = inputs["image_sizes"][image_index].tolist()
    layout = config_packed_layout(config, (height, width))
    kept = image_output.kept_indices[image_index].cpu()
    kept = kept[~layout.is_newline[kept]]
    scale = OVERLAY_LONG_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = processed_image(inputs["pixel_values"][image_index][0], image_processor).resize(size)
    boxes = (patch_boxes(layout, (height, width))[kept] * scale).round().long()
    return picture, [(left, top, right, bottom) for left, top, right, bottom in boxes.tolist()]


@dataclass(frozen=True)
class ModelFamily:
    """The pruning classes for one stock model type, and how its kept tokens map to boxes (None: no overlays)."""

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    kept_patch_view: KeptPatchView | None = None


# Stock model_type -> pruning classes. A converted checkpoint is found by its config class's own model type.
MODEL_FAMILIES: dict[str, ModelFamily] = {
    "llava": ModelFamily(AdaPruneConfig, AdaPruneLlavaForConditionalGeneration, llava_kept_patches),
    "llava_next": ModelFamily(
        AdaPruneLlavaNextConfig, AdaPruneLlavaNextForConditionalGeneration, llava_next_kept_patches
    ),
}


def family_for(model_type: str | None, source: str) -> ModelFamily:
    """The family of a stock or converted model type, or a UsageError listing the supported ones."""
    for stock_type, family in MODEL_FAMILIES.items():
        if model_type in (stock_type, family.config_class.model_type):
            return family
    supported = sorted([*MODEL_FAMILIES, *(family.config_class.model_type for family in MODEL_FAMILIES.values())])
    raise UsageError(f"{source!r} has model_type {model_type!r}; adaprune supports {supported}")


def read_source_config(source: str, role: str) -> dict[str, Any]:
    """config.json of a checkpoint directory or Hub id, with one-line errors naming `role` (e.g. 'MODEL')."""
    path = Path(source)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"{role} {source!r} is not a checkpoint directory (no config.json in it)")
        return read_config(path)
    if not HUB_ID.match(source):
        raise UsageError(f"{role} {source!r} does not exist; pass a checkpoint directory or a Hub id like org/name")
    try:
        config, _ = PretrainedConfig.get_config_dict(source)
    except OSError as error:
        raise UsageError(
            f"{role} {source!r} is no local directory, and the Hub could not provide it: {first_line(error)}"
        ) from error
    return config


def checked_settings(config: dict[str, Any], overrides: Mapping[str, Any], source: str) -> PruningSettings:
    """The pruning settings of a config with the command-line overrides, validated (UsageError naming the option)."""
    settings_class = settings_class_for(config.get("model_type"))
    foreign = sorted(set(overrides) - set(settings_class.field_names()))
    if foreign:
        options = ", ".join(f"--{name.replace('_', '-')}" for name in foreign)
        raise UsageError(
            f"{options} {'applies' if len(foreign) == 1 else 'apply'} only to LLaVA-NeXT checkpoints, and {source!r} "
            "has model_type "
            f"{config.get('model_type')!r}; drop {options}"
        )
    try:
        return settings_class(**{**pruning_fields(config), **overrides})
    except ValueError as error:
        field = str(error).split()[0]
        where = f"--{field.replace('_', '-')}" if field in overrides else f"{source}/config.json"
        raise UsageError(f"{error} (from {where})") from error


@dataclass
class LoadedModel:
    """A pruning model in eval mode with its processor, family and where it came from."""

    model: PreTrainedModel
    processor: ProcessorMixin
    family: ModelFamily
    source: str
    converted: bool  # the source is already a converted (pruning) checkpoint


def load_model(source: str, overrides: Mapping[str, Any], role: str = "MODEL") -> LoadedModel:
    """Loads a stock or converted checkpoint as the pruning model, with the settings overridden."""
    config = read_source_config(source, role)
    family = family_for(config.get("model_type"), source)
    checked_settings(config, overrides, source)
    try:
        model = family.model_class.from_pretrained(source, **overrides).eval()
        processor = AutoProcessor.from_pretrained(source)
    except OSError as error:
        raise UsageError(f"{role} {source!r} could not be loaded: {first_line(error)}") from error
    converted = config.get("model_type") == family.config_class.model_type
    return LoadedModel(model, processor, family, source, converted)


def convert_checkpoint(
    source: str,
    dest: Path,
    overrides: Mapping[str, Any],
    *,
    base_model: str | None = None,
    license: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a checkpoint that loads with trust_remote_code: weights, config with auto_map, code files, processor,
    generation config, and a model card. Prints where the card's base model and licence came from."""
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise UsageError(f"DEST {str(dest)!r} exists and is not empty; choose a new directory or pass --overwrite")
    if Path(source).exists() and dest.resolve() == Path(source).resolve():
        raise UsageError(f"DEST {str(dest)!r} is the source checkpoint itself; choose another directory")
    loaded = load_model(source, overrides, role="SRC")
    if dest.exists():
        shutil.rmtree(dest)
    loaded.model.save_pretrained(dest)
    loaded.processor.save_pretrained(dest)
    base_model = base_model or base_model_id(source)
    if license is None:
        license, where = base_model_license(source)
        print(f"license: {license or 'unknown, written as other'} ({where}); --license sets it")
    if base_model is None:
        print(f"base_model: unknown for the local directory {source}; --base-model HUB_ID sets it")
    write_model_card(dest, base_model=base_model, license=license)
    print(f"converted {source} -> {dest} ({type(loaded.model).__name__}; loads with trust_remote_code=True)")
    return dest


@dataclass(frozen=True)
class ImageSet:
    """Images by name, loaded one at a time (a folder of files or a saved `datasets` dataset)."""

    names: list[str]
    load: Callable[[int], Image.Image]
    description: str

    def __len__(self) -> int:
        return len(self.names)


@contextmanager
def _reading(path: Path) -> Iterator[Image.Image]:
    """Opens an image file; any failure to open or decode it in the block is a UsageError naming the file."""
    if not path.is_file():
        raise UsageError(f"image {str(path)!r} is not a file; pass an image file")
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, UnidentifiedImageError) as error:
        raise UsageError(
            f"cannot read image {str(path)!r} ({first_line(error)}); pass a PNG, JPEG or similar file"
        ) from error


def open_image(path: Path) -> Image.Image:
    """An image file as RGB, or a UsageError naming the file."""
    with _reading(path) as image:
        return image.convert("RGB")


def _dataset_images(path: Path, image_column: str | None) -> ImageSet:
    """A dataset saved with `datasets`: its first Image column, or `image_column`."""
    import datasets  # slow to import; only needed for datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        raise UsageError(
            f"IMAGES {str(path)!r} is a DatasetDict with splits {sorted(loaded)}; pass one split's directory"
        )
    image_columns = [name for name, feature in loaded.features.items() if isinstance(feature, datasets.Image)]
    if image_column is None:
        if not image_columns:
            raise UsageError(f"IMAGES {str(path)!r} has no image column (columns: {sorted(loaded.features)})")
        image_column = image_columns[0]
    elif image_column not in image_columns:
        raise UsageError(
            f"--image-column {image_column!r} is not an image column of {str(path)!r}; image columns: {image_columns}"
        )
    if len(loaded) == 0:
        raise UsageError(f"IMAGES {str(path)!r} is an empty dataset")
    column = loaded.select_columns([image_column])
    return ImageSet(
        names=[f"row{index}" for index in range(len(loaded))],
        load=lambda index: column[index][image_column].convert("RGB"),
        description=f"{path} (dataset column {image_column!r})",
    )


def image_set(path: Path, image_column: str | None = None) -> ImageSet:
    """IMAGES: a folder of image files (sorted by name) or a dataset saved with `datasets.save_to_disk`."""
    if not path.is_dir():
        raise UsageError(f"IMAGES {str(path)!r} is not a directory; pass a folder of images or a saved dataset")
    if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return _dataset_images(path, image_column)
    if image_column is not None:
        raise UsageError(f"--image-column only applies to a saved dataset, and {str(path)!r} is a folder of files")
    files = sorted(file for file in path.iterdir() if file.suffix.lower() in IMAGE_EXTENSIONS and file.is_file())
    if not files:
        raise UsageError(f"IMAGES {str(path)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    for file in files:  # reads only the headers: an unreadable file fails now, not after the model has loaded
        with _reading(file):
            pass
    return ImageSet(
        names=[file.name for file in files], load=lambda index: open_image(files[index]), description=str(path)
    )


def _image_inputs(processor: ProcessorMixin, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
    """What the model's image methods take for these images: pixel_values and, where the processor gives them,
    image_sizes."""
    features = processor.image_processor(images=list(images), return_tensors="pt")
    return {name: features[name] for name in ("pixel_values", "image_sizes") if name in features}


def collect_energy_curves(loaded: LoadedModel, images: ImageSet, batch_size: int) -> list[list[torch.Tensor]]:
    """Every image's energy curves (one per budget unit), computed once, in batches, with a progress bar."""
    curves: list[list[torch.Tensor]] = []
    with tqdm(total=len(images), unit="image", desc="energy curves") as progress:
        for start in range(0, len(images), batch_size):
            batch = [images.load(index) for index in range(start, min(start + batch_size, len(images)))]
            inputs = _image_inputs(loaded.processor, batch)
            for units in loaded.model.model.image_energy_curves(inputs["pixel_values"], inputs.get("image_sizes")):
                curves.append([curve.cpu() for curve in units])
            progress.update(len(batch))
    return curves


def kept_patch_overlay(
    loaded: LoadedModel, inputs: Mapping[str, torch.Tensor], index: int, image_output: Any
) -> Image.Image | None:
    """The image the model saw with its kept patches drawn, or None when the family has no box mapping."""
    view = loaded.family.kept_patch_view
    if view is None:
        return None
    picture, boxes = view(inputs, index, image_output, loaded.model.config, loaded.processor.image_processor)
    return draw_kept_patches(picture, boxes)


def _example_indices(budgets: Sequence[int], count: int) -> list[int]:
    """Up to `count` images spread from the smallest to the largest budget."""
    order = sorted(range(len(budgets)), key=lambda index: (budgets[index], index))
    if len(order) <= count:
        return order
    return sorted({order[round(step * (len(order) - 1) / (count - 1))] for step in range(count)}, key=order.index)


@dataclass(frozen=True)
class CalibrationRun:
    """What `calibrate_checkpoint` found and wrote."""

    calibration: Calibration
    record: dict[str, Any]  # statistics, settings, images, per-image budgets (what calibration.json holds)
    files: list[Path]


SETTING_SYMBOLS = {"energy_ratio": "tau", "marginal_share": "lambda"}


def print_budget_report(stats: Mapping[str, Any]) -> None:
    """Target, the calibrated setting and the spread of the budgets (`Calibration.statistics()`), in two lines."""
    setting = stats["calibrated_setting"]
    symbol = f" ({SETTING_SYMBOLS[setting]})" if setting in SETTING_SYMBOLS else ""
    print(
        f"calibrated {setting}{symbol} = {stats[setting]} on {stats['n_images']} images: mean budget "
        f"{stats['mean']:.2f} tokens (target {stats['target_mean_tokens']:g}), on average "
        f"{stats['mean_kept_fraction']:.1%} of an image's tokens"
    )
    print(
        f"  min {stats['min']}  p10 {stats['p10']:.1f}  p25 {stats['p25']:.1f}  median {stats['p50']:.1f}  "
        f"p75 {stats['p75']:.1f}  p90 {stats['p90']:.1f}  max {stats['max']}"
    )


def _calibrated_rule(settings: PruningSettings) -> SpectralBudgetRule:
    """The budget rule calibration searches a setting of (energy_ratio for 'energy', ...)."""
    rule = settings.budget_rule
    if not isinstance(rule, SpectralBudgetRule) or rule.calibrated_setting is None:
        calibrated = [name for name, method in BUDGET_RULES.items() if method.calibrated_setting is not None]
        raise UsageError(
            f"calibration searches a setting of the budget rule, but budget_mode {settings.budget_mode!r} has none "
            f"to search; pass --budget-mode with one of {calibrated}"
        )
    return rule


def check_calibration_request(source: str, overrides: Mapping[str, Any], write_config: bool) -> None:
    """The checks `calibrate_checkpoint` makes, from config.json alone, so bad requests fail before loading."""
    _calibrated_rule(checked_settings(read_source_config(source, "MODEL"), overrides, source))
    if write_config:
        require_converted_directory(source)


def require_converted_directory(source: str) -> None:
    """UsageError unless `source` is a local converted checkpoint (what --write-config can update)."""
    config = read_source_config(source, "MODEL")
    family = family_for(config.get("model_type"), source)
    if not Path(source).is_dir() or config.get("model_type") != family.config_class.model_type:
        raise UsageError(
            f"--write-config needs a converted checkpoint directory, and MODEL {source!r} is not one; "
            "run adaprune convert first and calibrate the result"
        )


def calibrate_checkpoint(
    loaded: LoadedModel,
    images: ImageSet,
    target_mean_tokens: float,
    output_dir: Path,
    *,
    batch_size: int = 8,
    examples: int = 4,
    write_config: bool = False,
) -> CalibrationRun:
    """Finds tau so that the mean budget over the images is the target (within one token), sets it on the loaded
    model, prints the statistics, and writes calibration.json and the plots to `output_dir`. With `write_config`
    it stores tau (and the other settings used) in the checkpoint's config.json and the record next to it, and
    re-renders the checkpoint's card."""
    rule = _calibrated_rule(loaded.model.config.pruning)
    if write_config:
        require_converted_directory(loaded.source)
    curves = collect_energy_curves(loaded, images, batch_size)
    calibration = calibrate(rule, UnitCurves.from_images(curves), target_mean_tokens)
    for name, value in calibration.settings.items():
        setattr(loaded.model.config, name, value)
    record = {
        "statistics": calibration.statistics(),
        "settings": loaded.model.config.pruning.as_dict(),
        "images": images.description,
        "budgets": dict(zip(images.names, calibration.budgets)),
    }
    print_budget_report(record["statistics"])

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "calibration.json").write_text(json.dumps(record, indent=2) + "\n")
    chosen = _example_indices(calibration.budgets, examples)
    files = [
        output_dir / "calibration.json",
        save_budget_histogram(
            calibration.budgets,
            f"{calibration.setting} {calibration.value:g}",
            target_mean_tokens,
            output_dir / "budget_histogram.png",
        ),
        save_energy_curves(
            {images.names[index]: [curve.numpy() for curve in curves[index]] for index in chosen},
            {images.names[index]: calibration.budgets[index] for index in chosen},
            calibration.settings.get("energy_ratio"),
            output_dir / "energy_curves.png",
        ),
    ]
    overlays = _example_overlays(loaded, images, chosen, calibration)
    if overlays:
        files.append(save_overlays(overlays, output_dir / "kept_patches.png"))
    if write_config:
        files.extend(_store_calibration(Path(loaded.source), record))
    for path in files:
        print(f"wrote {path}")
    return CalibrationRun(calibration, record, files)


def _example_overlays(
    loaded: LoadedModel, images: ImageSet, chosen: list[int], calibration: Calibration
) -> list[tuple[str, Image.Image]]:
    """Kept-patch overlays of the chosen images at the calibrated tau, checked against the calibrated budgets."""
    if loaded.family.kept_patch_view is None:
        print(f"(no kept-patch overlays for {type(loaded.model).__name__})")
        return []
    inputs = _image_inputs(loaded.processor, [images.load(index) for index in chosen])
    with torch.no_grad():
        image_output = loaded.model.get_image_features(**inputs)
    budgets = image_output.token_budgets.tolist()
    expected = [calibration.budgets[index] for index in chosen]
    if budgets != expected:
        raise RuntimeError(f"the model's budgets {budgets} differ from the calibrated ones {expected}")
    return [
        (f"{images.names[index]}: {budget} of {tokens} tokens", kept_patch_overlay(loaded, inputs, slot, image_output))
        for slot, (index, budget, tokens) in enumerate(zip(chosen, budgets, image_output.visual_tokens_per_image))
    ]


def _store_calibration(checkpoint: Path, record: dict[str, Any]) -> list[Path]:
    """Writes the calibrated settings into config.json, the record next to it, and re-renders the card."""
    config_path = checkpoint / "config.json"
    config = read_config(checkpoint)
    config.update(record["settings"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [config_path, write_calibration_record(checkpoint, record), write_model_card(checkpoint)]


def prompt_for(processor: ProcessorMixin, question: str, images: int = 1) -> str:
    """One user turn with `images` images and `question`, ready for the answer: the model's chat format when it has
    one, else LLaVA-1.5's plain USER/ASSISTANT format."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return f"USER: {'<image> ' * images}{question} ASSISTANT:"


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `run` over `repeats` calls, after one untimed warm-up call."""
    run()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def prefill_seconds(model: PreTrainedModel, inputs: Mapping[str, torch.Tensor], repeats: int) -> float:
    """Median time of one forward over the prompt, vision tower included, after one warm-up run."""
    with torch.no_grad():
        return median_seconds(lambda: model(**inputs, logits_to_keep=1), repeats)


@dataclass(frozen=True)
class RetentionSchedule:
    """A per-layer schedule: tokens kept after each decoder layer (its mean is the budget) and the tokens each
    layer sees (layer 0 every one), with the mutual information that shaped it (one value per budget unit)."""

    after_layer: list[int]
    seen_by_layer: list[int]
    budget: int
    mutual_information: list[float]


@dataclass(frozen=True)
class Inspection:
    """One image through the model, with pruning on and off."""

    budget: int
    tokens: int
    answers: dict[str, str]  # "pruned" / "unpruned" -> greedy answer
    prefill_seconds: dict[str, float]
    overlay: Path | None
    schedule: RetentionSchedule | None = None


def finally_kept(model: PreTrainedModel, inputs: Mapping[str, torch.Tensor], image_output: Any) -> Any:
    """`image_output` with the tokens each image keeps in the end: an in-LLM selector chooses them inside the
    language model, so a forward on `inputs` tells (its deepest pruning layer's; the forward's
    `kept_indices_by_layer` and `selector_report` go on `image_output` too); a vision-stage selector's are already
    there."""
    if model.config.pruning.token_selector.stage == "language":
        forward = model(**inputs)
        by_layer = forward.kept_indices_by_layer
        image_output.kept_indices = by_layer[max(by_layer)]
        image_output.kept_indices_by_layer = by_layer
        image_output.selector_report = forward.selector_report
    return image_output


def retention_schedule_of(image_output: Any, image: int = 0) -> RetentionSchedule | None:
    """The visual tokens image `image` keeps after each decoder layer by its selector's schedule (summed over its
    budget units) and the tokens each layer sees, when the selector reports a schedule (AutoPrune)."""
    report = getattr(image_output, "selector_report", None)
    if not report or "tokens_per_layer" not in report:
        return None
    units_before = sum(len(budgets) for budgets in image_output.unit_budgets[:image])
    units = slice(units_before, units_before + len(image_output.unit_budgets[image]))
    scheduled = report["tokens_per_layer"][units].sum(0).tolist()
    by_layer = image_output.kept_indices_by_layer
    seen = [len(by_layer[max(cut for cut in by_layer if cut <= layer)][image]) for layer in range(len(scheduled))]
    information = report["mutual_information"][units].tolist()
    return RetentionSchedule(scheduled, seen, int(image_output.token_budgets[image]), information)


def inspect_image(
    loaded: LoadedModel,
    image_path: Path,
    output_dir: Path,
    *,
    question: str = DEFAULT_PROMPT,
    max_new_tokens: int = 32,
    repeats: int = 3,
) -> Inspection:
    """Budget, kept fraction and overlay of one image, and the greedy answer and prefill time with pruning on and
    off (the same model with `config.enabled` switched). Prints them side by side and writes the overlay PNG."""
    image = open_image(image_path)
    processor, model = loaded.processor, loaded.model
    inputs = processor(images=[image], text=[prompt_for(processor, question)], return_tensors="pt")
    with torch.no_grad():
        image_output = finally_kept(model, inputs, model.get_image_features(**_image_inputs(processor, [image])))
    budget, tokens = int(image_output.token_budgets.sum()), sum(image_output.visual_tokens_per_image)
    schedule = retention_schedule_of(image_output)
    answers, timings = {}, {}
    was_enabled = model.config.enabled
    try:
        for label, enabled in (("pruned", True), ("unpruned", False)):
            model.config.enabled = enabled  # read at every use, so the same model serves both
            with torch.no_grad():
                sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answers[label] = processor.decode(
                sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            ).strip()
            timings[label] = prefill_seconds(model, inputs, repeats)
    finally:
        model.config.enabled = was_enabled

    overlay_path = None
    overlay = kept_patch_overlay(loaded, inputs, 0, image_output)
    if overlay is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        overlay_path = output_dir / f"{image_path.stem}_kept_patches.png"
        title = f"{image_path.name}: {budget} of {tokens} tokens"
        if schedule is None:
            save_overlays([(title, overlay)], overlay_path)
        else:
            title = f"{image_path.name}: {len(image_output.kept_indices[0])} of {tokens} tokens at the last layer"
            save_overlay_with_schedule(
                title, overlay, schedule.after_layer, schedule.seen_by_layer, budget, overlay_path
            )
    result = Inspection(budget, tokens, answers, timings, overlay_path, schedule)
    print_inspection(image_path.name, budget_rule_label(model.config.pruning), result, repeats)
    return result


def budget_rule_label(settings: PruningSettings) -> str:
    """The budget rule and the settings that set its budgets' size, e.g. "energy (energy_ratio 0.9)"."""
    rule = settings.budget_rule
    names = [name for name in (rule.target_setting, rule.calibrated_setting) if name is not None]
    return f"{rule.name} ({', '.join(f'{name} {getattr(rule, name):g}' for name in names)})" if names else rule.name


def print_inspection(name: str, budget_rule: str, result: Inspection, repeats: int) -> None:
    """The inspection as a small table: pruned and unpruned side by side."""
    print(
        f"{name}: {result.budget} of {result.tokens} visual tokens kept ({result.budget / result.tokens:.1%}) "
        f"with budget_mode {budget_rule}"
    )
    print(f"  {'':<9} {'prefill':>9}  answer")
    for label in ("pruned", "unpruned"):
        print(f"  {label:<9} {result.prefill_seconds[label] * 1e3:>6.0f} ms  {result.answers[label]!r}")
    print(f"  (prefill: median of {repeats} after a warm-up, vision tower included, {torch.get_num_threads()} threads)")
    schedule = result.schedule
    if schedule is not None:
        mean = sum(schedule.after_layer) / len(schedule.after_layer)
        information = ", ".join(f"{value:.3f}" for value in schedule.mutual_information)
        print(
            f"  schedule, visual tokens after each decoder layer: {schedule.after_layer} (mean {mean:.1f}, budget "
            f"{schedule.budget}); each layer sees {schedule.seen_by_layer}; mutual information {information} bits"
        )
    if result.overlay is not None:
        print(f"wrote {result.overlay}")
