"""The main job, end to end: convert a LLaVA checkpoint, load it through the Auto classes, prune and generate.

With no --model it builds a small LLaVA locally (LLaVA-1.5 vision geometry, an 8-layer 512-wide language model,
random weights; cached), so it runs offline. It prints each image's token budget, the answers, and the prefill
time with pruning on and off.

    python -m adaprune.demo [--model DIR_OR_HUB_ID] [--energy-ratio 0.9] [--output-dir outputs/demo]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from .modeling_adaprune import AdaPruneLlavaForConditionalGeneration
from .tiny_llava import DEMO_GEOMETRY, sample_images, save_tiny_llava

DEFAULT_QUESTION = "describe this picture"


def default_checkpoint() -> Path:
    """The built-in small LLaVA, created once under the user's cache directory."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adaprune" / "demo-llava-1.5-geometry"
    if not (cache / "model.safetensors").exists():
        print(f"building the built-in small LLaVA in {cache} ...")
        save_tiny_llava(cache, DEMO_GEOMETRY)
    return cache


def prompt_for(processor, question: str) -> str:
    """The model's chat format when it has one, else LLaVA-1.5's plain USER/ASSISTANT format."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: <image> {question} ASSISTANT:"


def median_seconds(run, repeats: int = 3) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="llava-hf checkpoint directory or Hub id (default: built-in small LLaVA)")
    parser.add_argument("--energy-ratio", type=float, default=0.9, help="spectral energy kept, tau in (0, 1]")
    parser.add_argument("--min-tokens", type=int, default=16, help="smallest budget an image can get")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    source = args.model or default_checkpoint()
    converted = args.output_dir / "converted"
    model = AdaPruneLlavaForConditionalGeneration.from_pretrained(
        source, energy_ratio=args.energy_ratio, min_tokens=args.min_tokens
    )
    model.save_pretrained(converted)
    AutoProcessor.from_pretrained(source).save_pretrained(converted)
    print(f"converted {source} -> {converted} (loads with trust_remote_code=True)")

    model = AutoModelForImageTextToText.from_pretrained(converted, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(converted)
    print(f"loaded {type(model).__name__} from {type(model).__module__}")

    image_size = processor.image_processor.crop_size["height"]
    images = sample_images(image_size)
    prompts = [prompt_for(processor, args.question)] * len(images)
    inputs = processor(images=list(images.values()), text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_output = model.get_image_features(pixel_values=inputs["pixel_values"])
        pruned_sequences = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        pruned_prefill = median_seconds(lambda: model(**inputs, logits_to_keep=1))
        model.config.enabled = False
        stock_sequences = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        stock_prefill = median_seconds(lambda: model(**inputs, logits_to_keep=1))
        model.config.enabled = True

    prompt_length = inputs["input_ids"].shape[1]
    pruned_answers = processor.batch_decode(pruned_sequences[:, prompt_length:], skip_special_tokens=True)
    stock_answers = processor.batch_decode(stock_sequences[:, prompt_length:], skip_special_tokens=True)
    print(f"\nenergy_ratio={model.config.energy_ratio}  min_tokens={model.config.min_tokens}")
    print(f"{'image':<10} {'budget':>7} {'kept':>7}  answer (pruned | stock)")
    for name, budget, tokens, pruned_answer, stock_answer in zip(
        images, image_output.token_budgets.tolist(), image_output.tokens_per_image, pruned_answers, stock_answers
    ):
        print(f"{name:<10} {budget:>7} {budget / tokens:>7.1%}  {pruned_answer.strip()!r} | {stock_answer.strip()!r}")
    kept = sum(image_output.token_budgets.tolist())
    total = sum(image_output.tokens_per_image)
    print(
        f"\nbatch of {len(images)}: {kept} of {total} visual tokens kept; prefill {pruned_prefill * 1e3:.0f} ms "
        f"pruned vs {stock_prefill * 1e3:.0f} ms stock (median of 3, {torch.get_num_threads()} threads)"
    )
    if not args.model:
        print("(built-in model: random weights, so the answers are arbitrary words)")


if __name__ == "__main__":
    main()
