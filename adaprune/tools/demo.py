"""The main job, end to end and offline: convert a LLaVA checkpoint, calibrate tau on sample images, inspect two.

With no --model it runs on the built-in model, a small LLaVA trained on adaprune's synthetic visual-question task
(shipped with the package), and its sample images are scenes of that task from sparse to dense, each with its
question. With --model DIR_OR_HUB_ID the images range from a flat colour to dense noise. Steps, each an `adaprune`
subcommand:

1. convert the checkpoint into OUTPUT_DIR/converted (loads with trust_remote_code);
2. calibrate tau there so the mean budget over the images is --target-mean-tokens, writing it into the config and
   the plots into OUTPUT_DIR;
3. (built-in model) answer every scene's question with pruning on and off, next to the right answer;
4. inspect the plainest and the busiest image: budget, kept patches, answers and prefill times pruned vs unpruned.

    adaprune demo [--model DIR_OR_HUB_ID] [--target-mean-tokens N] [--output-dir outputs/demo]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import synthetic_vqa
from .builtin_llava import builtin_checkpoint
from .evaluation import normalized, pruning_settings
from .tiny_llava import sample_images
from .workflow import (
    DEFAULT_PROMPT,
    LoadedModel,
    calibrate_checkpoint,
    convert_checkpoint,
    image_set,
    inspect_image,
    load_model,
    open_image,
    positive_float,
    positive_int,
    prompt_for,
)

NOISE_SHARES = (0.125, 0.25, 0.5)
SCENES_PER_DENSITY = 4
BUILTIN_TARGET = 24  # of the built-in model's 144 tokens per image
CHECKPOINT_TARGET = 64  # of LLaVA-1.5's 576


def demo_scenes() -> dict[str, synthetic_vqa.Sample]:
    """The first calibration-split scenes of each density, by file name (e.g. 'sparse-3.png')."""
    scenes: dict[str, synthetic_vqa.Sample] = {}
    index = 0
    while len(scenes) < SCENES_PER_DENSITY * len(synthetic_vqa.DENSITIES):
        item = synthetic_vqa.sample("calibration", index)
        if sum(name.startswith(item.density) for name in scenes) < SCENES_PER_DENSITY:
            scenes[f"{item.density}-{index}.png"] = item
        index += 1
    return dict(sorted(scenes.items(), key=lambda entry: list(synthetic_vqa.DENSITIES).index(entry[1].density)))


def demo_images(size: int) -> dict[str, Image.Image]:
    """`sample_images` (plain, gradient, shapes, busy) plus the gradient with its top 1/8, 1/4 and 1/2 replaced by
    the busy image's noise, so that calibration sees a spread of densities rather than two clusters."""
    images = sample_images(size)
    noise, gradient = np.asarray(images["busy"]), np.asarray(images["gradient"])
    for share in NOISE_SHARES:
        mixed = gradient.copy()
        rows = round(size * share)
        mixed[:rows] = noise[:rows]
        images[f"noise-top-{round(share * 100)}pct"] = Image.fromarray(mixed)
    return images


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="llava-hf checkpoint directory or Hub id (default: the built-in model)")
    parser.add_argument(
        "--target-mean-tokens",
        type=positive_float,
        help=f"mean tokens per image (default {BUILTIN_TARGET} for the built-in model, else {CHECKPOINT_TARGET})",
    )
    parser.add_argument("--min-tokens", type=int, help="smallest budget an image can get (default 2 built-in, else 16)")
    parser.add_argument(
        "--question", help=f"question for inspect (default: each scene's own; {DEFAULT_PROMPT!r} with --model)"
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=12, help="answer length limit (default 12)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"), help="default outputs/demo")


def answer_scenes(loaded: LoadedModel, images_dir: Path, scenes: dict[str, synthetic_vqa.Sample]) -> None:
    """Each scene's question answered greedily with pruning on and off, next to the right answer."""
    model, processor = loaded.model, loaded.processor
    inputs = processor(
        images=[open_image(images_dir / name) for name in scenes],
        text=[prompt_for(processor, scene.question) for scene in scenes.values()],
        padding=True,
        return_tensors="pt",
    )
    answers = {}
    for label, enabled in (("pruned", True), ("unpruned", False)):
        with torch.no_grad(), pruning_settings(model, {"enabled": enabled}):
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answers[label] = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    width = max(len(scene.question) for scene in scenes.values())
    print(f"  {'image':<14} {'question':<{width}} {'right':<8} {'pruned':<10} unpruned")
    for row, (name, scene) in enumerate(scenes.items()):
        pruned, unpruned = (normalized(answers[label][row]) for label in ("pruned", "unpruned"))
        marks = [f"{answer}{'' if answer == scene.answer else ' ✗'}" for answer in (pruned, unpruned)]
        print(f"  {name:<14} {scene.question:<{width}} {scene.answer:<8} {marks[0]:<10} {marks[1]}")


def run(args: argparse.Namespace) -> int:
    """convert -> calibrate -> (answer) -> inspect, printing each step's report."""
    builtin = not args.model
    source = str(builtin_checkpoint()) if builtin else args.model
    target = args.target_mean_tokens or (BUILTIN_TARGET if builtin else CHECKPOINT_TARGET)
    min_tokens = args.min_tokens if args.min_tokens is not None else (2 if builtin else 16)
    output_dir: Path = args.output_dir
    converted = output_dir / "converted"
    print(f"== convert {'the built-in model ' if builtin else ''}{source}")
    convert_checkpoint(source, converted, {"min_tokens": min_tokens}, overwrite=True)

    loaded = load_model(str(converted), {})
    images_dir = output_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    scenes = demo_scenes() if builtin else {}
    pictures = (
        {name: scene.image() for name, scene in scenes.items()}
        if builtin
        else {
            f"{name}.png": image
            for name, image in demo_images(loaded.processor.image_processor.crop_size["height"]).items()
        }
    )
    for name, image in pictures.items():
        image.save(images_dir / name)
    images = image_set(images_dir)
    print(f"\n== calibrate on {len(images)} sample images in {images_dir}")
    budgets = calibrate_checkpoint(loaded, images, target, output_dir, write_config=True).record["budgets"]
    for name, budget in budgets.items():
        print(f"  {name:<22} {budget:>4} tokens")
    loaded = load_model(str(converted), {})
    if builtin:
        print("\n== answer each scene's question, pruned (calibrated tau) and unpruned")
        answer_scenes(loaded, images_dir, scenes)

    for name in (min(budgets, key=budgets.get), max(budgets, key=budgets.get)):
        print(f"\n== inspect {name}")
        question = args.question or (scenes[name].question if builtin else DEFAULT_PROMPT)
        inspect_image(loaded, images_dir / name, output_dir, question=question, max_new_tokens=args.max_new_tokens)
        if builtin and not args.question:
            print(f"  right answer: {scenes[name].answer!r}")
    print(f"\nconverted checkpoint: {converted}  (adaprune publish {converted} YOUR_NAME/REPO to upload it)")
    return 0


if __name__ == "__main__":
    import sys

    from .cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
