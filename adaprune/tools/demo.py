"""The main job, end to end and offline: convert a LLaVA checkpoint, calibrate tau on sample images, inspect two.

With no --model it builds a small LLaVA locally (LLaVA-1.5 vision geometry, an 8-layer 512-wide language model,
random weights; cached under the user's cache directory). The sample images range from a flat colour to dense
noise, with noise over a growing share of the picture in between. Steps, each an `adaprune` subcommand:

1. convert the checkpoint into OUTPUT_DIR/converted (loads with trust_remote_code);
2. calibrate tau there so the mean budget over the images is --target-mean-tokens, writing it into the config and
   the plots into OUTPUT_DIR;
3. inspect the plainest and the busiest image: budget, kept patches, answers and prefill times pruned vs unpruned.

    adaprune demo [--model DIR_OR_HUB_ID] [--target-mean-tokens 64] [--output-dir outputs/demo]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .tiny_llava import DEMO_GEOMETRY, sample_images, save_tiny_llava
from .workflow import (
    DEFAULT_PROMPT,
    calibrate_checkpoint,
    convert_checkpoint,
    image_set,
    inspect_image,
    load_model,
    positive_float,
    positive_int,
)

NOISE_SHARES = (0.125, 0.25, 0.5)


def default_checkpoint() -> Path:
    """The built-in small LLaVA, created once under the user's cache directory."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaprune" / "demo-llava-1.5-geometry"
    if not (cache / "model.safetensors").exists():
        print(f"building the built-in small LLaVA in {cache} ...")
        save_tiny_llava(cache, DEMO_GEOMETRY)
    return cache


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
    parser.add_argument("--model", help="llava-hf checkpoint directory or Hub id (default: built-in small LLaVA)")
    parser.add_argument(
        "--target-mean-tokens", type=positive_float, default=64, help="mean tokens per image (default 64)"
    )
    parser.add_argument("--min-tokens", type=int, default=16, help="smallest budget an image can get (default 16)")
    parser.add_argument("--question", default=DEFAULT_PROMPT, help=f"question for inspect (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=positive_int, default=12, help="answer length limit (default 12)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"), help="default outputs/demo")


def run(args: argparse.Namespace) -> int:
    """convert -> calibrate -> inspect, printing each step's report."""
    source = args.model or str(default_checkpoint())
    output_dir: Path = args.output_dir
    converted = output_dir / "converted"
    print(f"== convert {source}")
    convert_checkpoint(source, converted, {"min_tokens": args.min_tokens}, overwrite=True)

    loaded = load_model(str(converted), {})
    images_dir = output_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for name, image in demo_images(loaded.processor.image_processor.crop_size["height"]).items():
        image.save(images_dir / f"{name}.png")
    images = image_set(images_dir)
    print(f"\n== calibrate on {len(images)} sample images in {images_dir}")
    budgets = calibrate_checkpoint(loaded, images, args.target_mean_tokens, output_dir, write_config=True).record[
        "budgets"
    ]
    for name, budget in budgets.items():
        print(f"  {name:<22} {budget:>4} tokens")

    for name in (min(budgets, key=budgets.get), max(budgets, key=budgets.get)):
        print(f"\n== inspect {name}")
        inspect_image(loaded, images_dir / name, output_dir, question=args.question, max_new_tokens=args.max_new_tokens)
    if not args.model:
        print("\n(built-in model: random weights, so the answers are arbitrary words)")
    print(f"\nconverted checkpoint: {converted}  (adaprune publish {converted} YOUR_NAME/REPO to upload it)")
    return 0


if __name__ == "__main__":
    import sys

    from .cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
