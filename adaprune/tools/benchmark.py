"""Benchmarks: speed and memory of pruned generation, the cost of computing budgets, and the FLOPs/KV model.

Builds a LLaVA with LLaVA-1.5 vision geometry (576 tokens of width 1024) and a Llama-style language model with
random weights locally (no downloads), then measures, in one run:

1. end to end: time to first token (vision tower included), decode tokens/s, total ``generate()`` time and peak
   memory at each batch size, for the stock model, every registered budget rule at each target mean budget
   (`energy`, E-AdaPrune, with tau calibrated to it; `fixed` at that count; same selector), and the ideal: the
   stock model fed the sequence `energy` shortened (no pruning cost at all);
2. the budget computation alone (exact and randomized solvers) on 576 x 1024 and 2,880 x 1024 feature matrices,
   and the randomized solver's budget error against exact;
3. the analytical prefill FLOPs and KV-cache bytes of LLaVA-1.5-7B/13B and LLaVA-NeXT-8B against kept tokens.

It writes results.json, results.md and PNG plots to --output-dir.

    python -m adaprune.tools.benchmark [--quick] [--output-dir docs/benchmarks] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor, LogitsProcessor, LogitsProcessorList

from adaprune.method_energy import EnergyBudget
from adaprune.method_fixed import FixedBudget
from adaprune.methods import BUDGET_RULES, SELECTORS
from adaprune.modeling_adaprune import AdaPruneLlavaForConditionalGeneration
from adaprune.spectral_budget import budgets_from_curves, energy_curves

from .calibration import CalibrationError, UnitCurves, settings_for_target
from .cost_model import (
    CLIP_VIT_L_336,
    LLAVA_15_7B,
    LLAVA_15_13B,
    LLAVA_NEXT_8B,
    LLAVA_NEXT_MAX_VISUAL_TOKENS,
    LanguageModelGeometry,
    VisionTowerGeometry,
    kv_cache_bytes,
    language_model_prefill_flops,
    llava_prefill_flops,
    vision_flops,
)
from .reporting import machine_info, markdown_table
from .tiny_llava import LLAVA15_GEOMETRY, SMALL_GEOMETRY, Geometry, sample_images, save_tiny_llava
from .workflow import DEFAULT_PROMPT, median_seconds, positive_int, prompt_for

SUBJECT = EnergyBudget.name
"""The budget rule under study (E-AdaPrune's); the "ideal" variant feeds the stock model the tokens it keeps."""
BASELINE = FixedBudget.name
"""The fixed budget it is compared with at the same mean."""

# LLaVA-1.5 vision geometry (2 tower layers) and a 1024-wide Llama-style language model with LLaVA-1.5's vocabulary.
BENCHMARK_GEOMETRY = replace(
    LLAVA15_GEOMETRY, text_hidden=1024, text_layers=12, text_heads=16, text_intermediate=2816, text_vocab=32064
)
QUICK_GEOMETRY = SMALL_GEOMETRY
LANGUAGE_SELECTORS = [name for name, selector in SELECTORS.items() if selector.stage == "language"]
"""The in-LLM selectors, benchmarked with every budget rule at every target."""
SOLVERS = ("exact", "randomized")
SOLVER_TOKEN_MULTIPLES = (1, 5)  # one image, and five views stacked as LLaVA-NeXT's any-res layout does
SOLVER_BATCH = 8
TEXT_TOKENS_FOR_COST_MODEL = 40
ERROR_RATIOS = (0.5, 0.8, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class Setting:
    """What one run measures; `--quick` swaps in a tiny model and few repeats, for tests."""

    geometry: Geometry
    targets: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    images: int
    repeats: int
    new_tokens: int
    min_tokens: int
    solver_repeats: int


FULL = Setting(BENCHMARK_GEOMETRY, (64, 128, 192), (1, 8), 8, 3, 32, 16, 10)
QUICK = Setting(QUICK_GEOMETRY, (8, 16), (1, 2), 4, 1, 3, 2, 2)
SECTIONS = ("e2e", "solver", "cost")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, for `python -m adaprune.tools.benchmark` and `adaprune bench`."""
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and few repeats: checks the command, in seconds"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("docs/benchmarks"), help="where results go")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--targets", type=positive_int, nargs="+", help="mean budgets to calibrate to (64 128 192)")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", help="batch sizes (1 8)")
    parser.add_argument("--images", type=positive_int, help="benchmark images, of varied density (8)")
    parser.add_argument("--repeats", type=positive_int, help="timed repeats per measurement; medians are reported (3)")
    parser.add_argument("--new-tokens", type=positive_int, help="tokens generated per prompt, at least 2 (32)")
    parser.add_argument("--text-layers", type=positive_int, help="language-model layers (12)")


def _setting(args: argparse.Namespace) -> Setting:
    """The defaults of --quick or the full run, overridden by the options given."""
    base = QUICK if args.quick else FULL
    geometry = base.geometry if args.text_layers is None else replace(base.geometry, text_layers=args.text_layers)
    setting = replace(
        base,
        geometry=geometry,
        targets=tuple(args.targets or base.targets),
        batch_sizes=tuple(args.batch_sizes or base.batch_sizes),
        images=args.images or base.images,
        repeats=args.repeats or base.repeats,
        new_tokens=args.new_tokens or base.new_tokens,
    )
    tokens = geometry.tokens_per_image
    for target in setting.targets:
        if not setting.min_tokens <= target <= tokens:
            raise ValueError(
                f"--targets {target} is outside [{setting.min_tokens}, {tokens}], the budgets an image of this "
                f"model can get (min_tokens to tokens per image); choose targets in that range"
            )
    if setting.new_tokens < 2:
        raise ValueError(f"--new-tokens must be at least 2 to measure decoding, got {setting.new_tokens}")
    if max(setting.batch_sizes) > setting.images:
        raise ValueError(
            f"--batch-sizes {max(setting.batch_sizes)} is larger than --images {setting.images}; "
            "use at least as many images as the largest batch"
        )
    return setting


def _device(args: argparse.Namespace) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(call: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median wall time of `call` (under inference mode, device synchronized) over `repeats` runs after a warm-up."""

    def synchronized() -> None:
        call()
        _synchronize(device)

    with torch.inference_mode():
        return median_seconds(synchronized, repeats)


# --- memory -------------------------------------------------------------------------------------------------------


def _release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc), so a later RSS peak is not hidden by earlier runs' leftovers."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def _peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Yields a dict whose "bytes" is set, on exit, to the peak memory added while the block ran.

    CUDA: `torch.cuda.max_memory_allocated` above what was allocated before. CPU: resident set size (RSS) above
    the RSS before, sampled every millisecond by a thread; torch has no CPU allocator statistics, so this counts
    every page the process touched (activations, KV cache, allocator slack), not tensors alone.
    """
    result: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - before
        return
    _release_freed_memory()
    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["bytes"] = max(peak[0], process.memory_info().rss) - before


# --- end to end -----------------------------------------------------------------------------------------------------


class _StepClock(LogitsProcessor):
    """Records the time each generation step's logits are ready (the first call comes right after prefill)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        _synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


@dataclass
class GenerationTiming:
    """One `generate()` call: seconds to the first token, seconds of the remaining steps, and in all."""

    first_token: float
    decode: float
    total: float


def _timed_generate(
    model: LlavaForConditionalGeneration, inputs: dict, new_tokens: int, device: torch.device
) -> GenerationTiming:
    clock = _StepClock(device)
    _synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
    _synchronize(device)
    end = time.perf_counter()
    if len(clock.times) != new_tokens:
        raise RuntimeError(f"generate() ran {len(clock.times)} steps instead of {new_tokens}")
    return GenerationTiming(clock.times[0] - start, clock.times[-1] - clock.times[0], end - start)


@contextmanager
def _features_cut_to(model: LlavaForConditionalGeneration, kept_indices: list[torch.Tensor]) -> Iterator[None]:
    """Makes the stock model's image features return only the given kept rows per image (the ideal baseline):
    the vision tower and projector run as usual, and a gather cuts each image to its kept tokens."""
    stock_features = model.model.get_image_features

    def kept_features(pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        output = stock_features(pixel_values=pixel_values, **kwargs)
        output.pooler_output = [features[kept] for features, kept in zip(output.pooler_output, kept_indices)]
        return output

    model.model.get_image_features = kept_features
    try:
        yield
    finally:
        del model.model.get_image_features


def _shortened_inputs(inputs: dict, budgets: list[int], image_token_id: int, pad_token_id: int) -> dict:
    """The same prompts with only `budgets[row]` image placeholders in each row (one image per row), left-padded."""
    rows = []
    for ids, mask, budget in zip(inputs["input_ids"], inputs["attention_mask"], budgets):
        ids = ids[mask.bool()]
        placeholders = (ids == image_token_id).nonzero().flatten()
        rows.append(torch.cat([ids[: placeholders[0] + budget], ids[placeholders[-1] + 1 :]]))
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row) :] = row
        attention_mask[index, length - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": inputs["pixel_values"]}


def _on(inputs: dict, device: torch.device) -> dict:
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def _vision_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projector's input (the features the spectrum is taken from by default), as the matrices the solver
    section times: (n, N, d) float32."""
    config = model.config
    with torch.inference_mode():
        states = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    features = states[config.vision_feature_layer]
    return (features[:, 1:] if config.vision_feature_select_strategy == "default" else features).float()


def _language_model_geometry(config: Any) -> LanguageModelGeometry:
    text = config.text_config
    return LanguageModelGeometry(
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        intermediate_size=text.intermediate_size,
        num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads,
        vocab_size=text.vocab_size,
        head_dim=getattr(text, "head_dim", None),
    )


def _vision_geometry(config: Any) -> VisionTowerGeometry:
    vision = config.vision_config
    return VisionTowerGeometry(
        hidden_size=vision.hidden_size,
        num_layers=vision.num_hidden_layers,
        intermediate_size=vision.intermediate_size,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        projector_output=config.text_config.hidden_size,
    )


@dataclass
class Variant:
    """One way of running the model: which model, its pruning settings, and how its inputs are shortened."""

    name: str
    target: int | None
    settings: dict[str, Any]


def in_llm_layer(geometry: Geometry) -> int:
    """The layer the in-LLM selectors prune at: FastV's and AdaptPrune's K = 2, or the last for shallower models."""
    return min(2, geometry.text_layers - 1)


def _benchmark_images(size: int, count: int) -> list[Image.Image]:
    """`count` images of rising density: `sample_images`' shapes scene with random-pixel noise over the top
    fraction i / (count - 1) of its rows, from none to all. Budgets then spread over the whole range (the sample
    images alone are bimodal: only the noise image gets a large budget)."""
    generator = np.random.default_rng(0)
    images = []
    for index in range(count):
        pixels = np.array(sample_images(size, seed=index)["shapes"])
        rows = round(size * index / max(count - 1, 1))
        pixels[:rows] = generator.integers(0, 256, (rows, size, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def _end_to_end(
    setting: Setting,
    checkpoint: Path,
    processor: LlavaProcessor,
    stock: LlavaForConditionalGeneration,
    images: list,
    device: torch.device,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Calibrates tau per target on the images (their energy curves as the model computes them), then times every
    variant at every batch size."""
    pruned = AdaPruneLlavaForConditionalGeneration.from_pretrained(checkpoint, min_tokens=setting.min_tokens)
    pruned = pruned.to(device).eval()
    config = stock.config
    lm = _language_model_geometry(config)
    vision = _vision_geometry(config)
    prompt = prompt_for(processor, DEFAULT_PROMPT)
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
    curves = UnitCurves.from_images(pruned.model.image_energy_curves(pixel_values))
    vision_selector, layer = pruned.config.selector, in_llm_layer(setting.geometry)
    variants, calibration = [Variant("stock", None, {})], {}
    for target in setting.targets:
        in_llm = []
        for rule in BUDGET_RULES.values():
            try:
                settings, result = settings_for_target(rule, curves, target, setting.min_tokens)
            except CalibrationError as error:
                log(f"not benchmarked at mean {target}: {error}")
                continue
            variants.append(Variant(rule.name, target, {**settings, "selector": vision_selector}))
            in_llm += [
                Variant(f"{rule.name}·{selector}", target, {**settings, "selector": selector, "prune_layer": layer})
                for selector in LANGUAGE_SELECTORS
            ]
            if result is not None and rule.name == SUBJECT:
                calibration[str(target)] = {
                    **result.settings,
                    "budgets": list(result.budgets),
                    "mean_budget": result.mean_tokens,
                }
            if result is not None:
                log(f"calibrated {rule.name} at mean {target}: {result.settings}, budgets {list(result.budgets)}")
            if rule.name == SUBJECT:
                variants.append(Variant("ideal", target, {**settings, "selector": vision_selector}))
        variants += in_llm
    text_tokens = len(processor(images=images[:1], text=[prompt], return_tensors="pt")["input_ids"][0])
    text_tokens -= setting.geometry.tokens_per_image
    bytes_per_value = torch.finfo(stock.dtype).bits // 8

    rows, vision_seconds = [], {}
    for batch_size in setting.batch_sizes:
        batches = []
        for start in range(0, setting.images - batch_size + 1, batch_size):
            inputs = processor(
                images=images[start : start + batch_size], text=[prompt] * batch_size, padding=True, return_tensors="pt"
            )
            batches.append(inputs)
        pixel_batches = [inputs["pixel_values"].to(device) for inputs in batches]
        vision_seconds[str(batch_size)] = statistics.mean(
            _median_seconds(
                lambda pixels=pixels: stock.model.get_image_features(pixel_values=pixels), setting.repeats, device
            )
            for pixels in pixel_batches
        )
        for variant in variants:
            for name, value in variant.settings.items():
                setattr(pruned.config, name, value)
            runs = []
            for inputs in batches:
                model, run_inputs, budgets, kept, visual = _prepared(variant, stock, pruned, inputs, config, device)
                lengths = [[text_tokens + count for count in per_layer] for per_layer in visual]
                runs.append((model, run_inputs, budgets, kept, lengths))
            rows.append(_measure(variant, batch_size, runs, setting, device, lm, vision, text_tokens, bytes_per_value))
            log(_progress_line(rows[-1]))
    return {"calibration": calibration, "text_tokens": text_tokens, "vision_seconds": vision_seconds, "rows": rows}


def _prepared(
    variant: Variant,
    stock: LlavaForConditionalGeneration,
    pruned: AdaPruneLlavaForConditionalGeneration,
    inputs: dict,
    config: Any,
    device: torch.device,
) -> tuple[LlavaForConditionalGeneration, dict, list[int], list[torch.Tensor] | None, list[list[int]]]:
    """The model, inputs, per-image budgets, (ideal only) kept indices and per image the visual tokens each
    decoder layer sees, of one batch under a variant whose settings are already on `pruned.config` (an in-LLM
    selector's come from a forward: its cuts shorten the sequence layer by layer)."""
    n_layers, tokens, n_images = config.text_config.num_hidden_layers, config.image_seq_length, len(inputs["input_ids"])
    if variant.name == "stock":
        return stock, _on(inputs, device), [tokens] * n_images, None, [[tokens] * n_layers] * n_images
    with torch.inference_mode():
        image_output = pruned.model.get_image_features(pixel_values=inputs["pixel_values"].to(device))
    budgets = image_output.token_budgets.tolist()
    visual = [[budget] * n_layers for budget in budgets]
    if variant.name != "ideal":
        if pruned.config.pruning.token_selector.stage == "language":
            with torch.inference_mode():
                by_layer = pruned(**_on(inputs, device), logits_to_keep=1).kept_indices_by_layer
            cuts = sorted(by_layer)
            visual = [
                [len(by_layer[max(cut for cut in cuts if cut <= layer)][image]) for layer in range(n_layers)]
                for image in range(n_images)
            ]
        return pruned, _on(inputs, device), budgets, None, visual
    shortened = _shortened_inputs(inputs, budgets, config.image_token_id, config.text_config.pad_token_id)
    return stock, _on(shortened, device), budgets, image_output.kept_indices, visual


def _measure(
    variant: Variant,
    batch_size: int,
    runs: list[tuple],
    setting: Setting,
    device: torch.device,
    lm: LanguageModelGeometry,
    vision: VisionTowerGeometry,
    text_tokens: int,
    bytes_per_value: int,
) -> dict[str, Any]:
    """Times one variant at one batch size over all its batches: a warm-up pass that also measures peak memory,
    then `repeats` timed passes; per-batch means of each pass, medians over passes."""

    def one_pass(measure_memory: bool) -> tuple[list[GenerationTiming], list[int]]:
        timings, peaks = [], []
        for model, inputs, _, kept, _ in runs:
            with _features_cut_to(model, kept) if kept is not None else nullcontext():
                if measure_memory:
                    with _peak_memory(device) as peak:
                        timings.append(_timed_generate(model, inputs, setting.new_tokens, device))
                    peaks.append(peak["bytes"])
                else:
                    timings.append(_timed_generate(model, inputs, setting.new_tokens, device))
        return timings, peaks

    _, peaks = one_pass(measure_memory=True)
    passes = [one_pass(measure_memory=False)[0] for _ in range(setting.repeats)]

    def median_of_means(field: str) -> float:
        return statistics.median(statistics.mean(getattr(timing, field) for timing in timings) for timings in passes)

    # per batch, per prompt, the sequence length each decoder layer sees (in-LLM selectors shorten it at their cuts)
    all_lengths = [lengths for *_, lengths in runs]
    prompt_lengths = [per_layer for lengths in all_lengths for per_layer in lengths]
    padded = [[max(column) for column in zip(*lengths)] for lengths in all_lengths]
    first_token = median_of_means("first_token")
    decode = median_of_means("decode")
    kept = [budget for _, _, budgets, _, _ in runs for budget in budgets]
    lm_flops = statistics.mean(language_model_prefill_flops(lm, per_layer) for per_layer in prompt_lengths)
    layer_bytes = kv_cache_bytes(replace(lm, num_layers=1), 1, bytes_per_value)
    kv_per_layer = [
        statistics.mean(batch_size * layer_bytes * (lengths[layer] + setting.new_tokens) for lengths in padded)
        for layer in range(lm.num_layers)
    ]
    return {
        "variant": variant.name,
        "target": variant.target,
        "batch_size": batch_size,
        "batches": len(runs),
        "mean_kept": statistics.mean(kept),
        "min_kept": min(kept),
        "max_kept": max(kept),
        "visual_tokens_per_layer": [
            statistics.mean(lengths[layer] - text_tokens for lengths in prompt_lengths)
            for layer in range(lm.num_layers)
        ],
        "time_to_first_token_s": first_token,
        "decode_tokens_per_s": batch_size * (setting.new_tokens - 1) / decode,
        "generate_s": median_of_means("total"),
        "peak_memory_bytes": statistics.mean(peaks),
        "kv_cache_bytes": sum(kv_per_layer),
        "kv_cache_bytes_per_layer": kv_per_layer,
        "padding_fraction": statistics.mean(
            1 - sum(map(sum, lengths)) / (len(lengths) * sum(map(max, zip(*lengths)))) for lengths in all_lengths
        ),
        "prefill_flops_per_prompt": vision_flops(vision) + lm_flops,
        "language_model_flops_per_prompt": lm_flops,
    }


def _progress_line(row: dict[str, Any]) -> str:
    target = "" if row["target"] is None else f" @{row['target']}"
    return (
        f"  batch {row['batch_size']} {row['variant']}{target}: kept {row['mean_kept']:.1f}, "
        f"first token {row['time_to_first_token_s'] * 1e3:.0f} ms, decode {row['decode_tokens_per_s']:.1f} tok/s, "
        f"generate {row['generate_s']:.2f} s"
    )


# --- budget solvers ----------------------------------------------------------------------------------------------


def _solver_matrices(features: torch.Tensor, views: int) -> torch.Tensor:
    """SOLVER_BATCH matrices of `views` images' features stacked along tokens (cycling through the images)."""
    count = len(features)
    return torch.stack(
        [torch.cat([features[(first + view) % count] for view in range(views)]) for first in range(SOLVER_BATCH)]
    )


def _solvers(
    features: torch.Tensor, ratios: list[float], setting: Setting, device: torch.device, log: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    """Time of the budget computation alone (curves and budgets, with its host sync), per image and per batch, and
    the randomized solver's budget error against exact at several energy ratios (min_tokens 1: no clamp hides it)."""
    timings, errors = [], []
    for views in SOLVER_TOKEN_MULTIPLES:
        matrices = _solver_matrices(features, views).to(device)
        tokens, channels = matrices.shape[1:]
        for solver in SOLVERS:
            for batch in (1, SOLVER_BATCH):
                block = matrices[:batch]
                seconds = _median_seconds(
                    lambda block=block, solver=solver: budgets_from_curves(
                        energy_curves(block, solver=solver), 0.9
                    ).tolist(),
                    setting.solver_repeats,
                    device,
                )
                timings.append(
                    {
                        "tokens": tokens,
                        "channels": channels,
                        "solver": solver,
                        "batch": batch,
                        "seconds": seconds,
                        "ms_per_image": seconds * 1e3 / batch,
                    }
                )
                log(f"  {solver} {tokens}x{channels} batch {batch}: {seconds * 1e3 / batch:.1f} ms per image")
        exact = energy_curves(matrices, solver="exact")
        randomized = energy_curves(matrices, solver="randomized")
        for ratio in sorted(set(ERROR_RATIOS) | set(ratios)):
            exact_budgets = budgets_from_curves(exact, ratio).float()
            difference = budgets_from_curves(randomized, ratio).float() - exact_budgets
            errors.append(
                {
                    "tokens": tokens,
                    "energy_ratio": ratio,
                    "mean_exact_budget": exact_budgets.mean().item(),
                    "mean_abs_error": difference.abs().mean().item(),
                    "max_abs_error": difference.abs().max().item(),
                    "mean_signed_error": difference.mean().item(),
                }
            )
    return {"timings": timings, "errors": errors}


# --- cost model ---------------------------------------------------------------------------------------------------

REFERENCE_MODELS = {
    "LLaVA-1.5-7B": (LLAVA_15_7B, 576, 1),
    "LLaVA-1.5-13B": (LLAVA_15_13B, 576, 1),
    "LLaVA-NeXT-8B": (LLAVA_NEXT_8B, LLAVA_NEXT_MAX_VISUAL_TOKENS, 5),
}


def _cost_point(name: str, kept: int) -> dict[str, Any]:
    """Prefill FLOPs (whole model and language model) and fp16 KV-cache bytes of one prompt keeping `kept` tokens."""
    lm, full, views = REFERENCE_MODELS[name]
    vision = replace(CLIP_VIT_L_336, projector_output=lm.hidden_size)
    text = TEXT_TOKENS_FOR_COST_MODEL
    return {
        "model": name,
        "kept": kept,
        "visual_tokens": full,
        "prefill_flops": llava_prefill_flops(lm, vision, kept, text, views),
        "prefill_ratio": llava_prefill_flops(lm, vision, full, text, views)
        / llava_prefill_flops(lm, vision, kept, text, views),
        "language_model_ratio": language_model_prefill_flops(lm, full + text)
        / language_model_prefill_flops(lm, kept + text),
        "kv_cache_bytes": kv_cache_bytes(lm, kept + text),
    }


def _cost_model() -> dict[str, Any]:
    """The table points (full, 1/3, 2/9, 1/9 of the visual tokens: 576/192/128/64 for LLaVA-1.5) and curves."""
    table, curves = [], []
    for name, (_, full, _) in REFERENCE_MODELS.items():
        table.extend(_cost_point(name, kept) for kept in (full, full // 3, 2 * full // 9, full // 9))
        curves.extend(_cost_point(name, kept) for kept in range(full // 36, full + 1, full // 36))
    return {"text_tokens": TEXT_TOKENS_FOR_COST_MODEL, "table": table, "curves": curves}


# --- report -------------------------------------------------------------------------------------------------------


def _rows_by(results: dict[str, Any], batch_size: int) -> dict[tuple[str, int | None], dict[str, Any]]:
    return {
        (row["variant"], row["target"]): row for row in results["end_to_end"]["rows"] if row["batch_size"] == batch_size
    }


def _goals(results: dict[str, Any]) -> list[list[str]]:
    """The issue's three goals against this run: goal, what was measured, met or not."""
    goals = []
    if "end_to_end" in results:
        for batch_size in results["setting"]["batch_sizes"]:
            rows = _rows_by(results, batch_size)
            overheads = {
                target: rows[(SUBJECT, target)]["time_to_first_token_s"]
                / rows[("ideal", target)]["time_to_first_token_s"]
                - 1
                for target in results["setting"]["targets"]
            }
            worst = max(overheads, key=overheads.get)
            goals.append(
                [
                    f"{SUBJECT} over ideal time to first token <= 5% (batch {batch_size})",
                    ", ".join(f"{target}: {value:+.1%}" for target, value in overheads.items()),
                    _verdict(overheads[worst] <= 0.05, f"worst {overheads[worst]:+.1%} at mean {worst}"),
                ]
            )
        batch_size = min(results["setting"]["batch_sizes"])
        rows = _rows_by(results, batch_size)
        target = min(results["setting"]["targets"])
        stock, adaptive = rows[("stock", None)], rows[(SUBJECT, target)]
        vision = results["end_to_end"]["vision_seconds"][str(batch_size)]
        measured = stock["time_to_first_token_s"] / adaptive["time_to_first_token_s"]
        language_model = (stock["time_to_first_token_s"] - vision) / (adaptive["time_to_first_token_s"] - vision)
        lm_ratio = stock["language_model_flops_per_prompt"] / adaptive["language_model_flops_per_prompt"]
        whole_ratio = stock["prefill_flops_per_prompt"] / adaptive["prefill_flops_per_prompt"]
        goals.append(
            [
                f"prefill speedup at mean {target} within 10% of the language model's FLOPs ratio (batch {batch_size})",
                (
                    f"language model (first token minus the {vision * 1e3:.0f} ms vision tower): "
                    f"{language_model:.2f}x against {lm_ratio:.2f}x FLOPs; whole first token: {measured:.2f}x "
                    f"against {whole_ratio:.2f}x FLOPs"
                ),
                _verdict(
                    abs(language_model / lm_ratio - 1) <= 0.10,
                    f"{language_model / lm_ratio - 1:+.1%} of the FLOPs ratio",
                ),
            ]
        )
    if "solvers" in results:
        exact = [row for row in results["solvers"]["timings"] if row["solver"] == "exact" and row["batch"] == 1]
        row = min(exact, key=lambda row: row["tokens"])
        threads = results["machine"]["torch_threads"]
        goals.append(
            [
                "exact budget <= 8 ms per 576x1024 image on 2 CPU threads",
                f"{row['ms_per_image']:.1f} ms per {row['tokens']}x{row['channels']} image, batch 1, {threads} threads",
                _verdict(row["ms_per_image"] <= 8, f"{row['ms_per_image'] / 8:.2f}x the goal"),
            ]
        )
    return goals


def _verdict(met: bool, detail: str) -> str:
    return f"{'met' if met else 'not met'} ({detail})"


def _markdown(results: dict[str, Any], plots: list[str]) -> str:
    """results.md: machine, command, settings, one table per section, the goals, and the plots."""
    machine, setting = results["machine"], results["setting"]
    parts = [
        "# Benchmark results",
        "Generated by `adaprune/tools/benchmark.py`; do not edit by hand, re-run the command instead.",
        f"Command: `{results['command']}`",
        markdown_table(["machine", ""], [[key, value] for key, value in machine.items()]),
        (
            f"Load average (1 min) after the run: {results['load_average_1min_after']:.2f}. Other processes on the "
            "same cores distort timings; compare only runs made on an otherwise idle machine."
        ),
    ]
    if results.get("quick"):
        parts.append("**Quick run: a tiny model to check the command. These numbers say nothing about performance.**")
    geometry = setting["geometry"]
    if "end_to_end" in results or "solvers" in results:
        parts.append(
            "Model: vision tower {vision_layers} layers x {vision_hidden} wide ({tokens} visual tokens per image), "
            "language model {text_layers} layers x {text_hidden} wide, MLP {text_intermediate}, {text_heads} heads, "
            "vocabulary {vocab}; random weights, float32. {images} images of varied density, {new_tokens} new tokens per "
            "prompt, medians of {repeats} timed passes after a warm-up pass; min_tokens {min_tokens}.".format(
                tokens=results.get("tokens_per_image"),
                vocab=geometry["text_vocab"] or "tokenizer's",
                images=setting["images"],
                new_tokens=setting["new_tokens"],
                repeats=setting["repeats"],
                min_tokens=setting["min_tokens"],
                **geometry,
            )
        )
    if "end_to_end" in results:
        parts.append(_end_to_end_markdown(results))
    if "solvers" in results:
        parts.append(_solvers_markdown(results["solvers"], machine))
    if "cost_model" in results:
        parts.append(_cost_markdown(results["cost_model"]))
    goals = _goals(results)
    parts.append(
        "## Goals\n\n"
        + (
            markdown_table(["goal", "measured", "status"], goals)
            if goals
            else "The sections run measure none of the goals."
        )
    )
    parts.append("## Plots\n\n" + "\n\n".join(f"![{name}]({name})" for name in plots))
    return "\n\n".join(parts) + "\n"


def _end_to_end_markdown(results: dict[str, Any]) -> str:
    e2e = results["end_to_end"]
    parts = [
        "## End to end",
        markdown_table(
            ["mean target", "energy ratio (tau)", "mean budget", "budgets of the images"],
            [
                [target, f"{entry['energy_ratio']:.4f}", f"{entry['mean_budget']:.1f}", entry["budgets"]]
                for target, entry in e2e["calibration"].items()
            ],
        ),
    ]
    parts.append(
        "Time to first token includes the vision tower and pruning; the vision tower alone takes "
        + ", ".join(f"{seconds * 1e3:.0f} ms at batch {size}" for size, seconds in e2e["vision_seconds"].items())
        + " (stock get_image_features). Peak memory: "
        + (
            "CUDA memory allocated above the weights."
            if results["machine"]["device"] == "cuda"
            else "resident memory (RSS) added during generate(), sampled every 1 ms; it counts every page touched, not "
            "tensors alone."
        )
        + " KV cache: analytical, batch x (longest prefill row in the layer + new tokens), over all layers and per "
        "layer; an in-LLM selector's variants (`rule·selector`) keep every visual token in the layers below their "
        "first cut and fewer after (per layer: the first / the last layer): FastV and AdaptPrune cut once, at "
        "decoder layer K (the selectors' default 2), to the budget; AutoPrune after every layer, on a schedule whose "
        "mean over the layers is the budget (the first layer sees every token, so the tokens it processes per layer "
        "average more: see `visual_tokens_per_layer` in results.json). "
        "Ratios are to the stock model of the "
        f"same run (higher is better for speed, lower for memory). Overhead: {SUBJECT}'s time to first token over "
        "the ideal's at the same kept tokens."
    )
    for batch_size in results["setting"]["batch_sizes"]:
        rows = _rows_by(results, batch_size)
        stock = rows[("stock", None)]
        table = []
        for (variant, target), row in rows.items():
            ideal = rows.get(("ideal", target))
            overhead = (
                ""
                if variant != SUBJECT
                else f"{row['time_to_first_token_s'] / ideal['time_to_first_token_s'] - 1:+.1%}"
            )
            table.append(
                [
                    variant,
                    target or "",
                    f"{row['mean_kept']:.1f} ({row['min_kept']}-{row['max_kept']})",
                    f"{row['time_to_first_token_s'] * 1e3:.0f}",
                    f"{stock['time_to_first_token_s'] / row['time_to_first_token_s']:.2f}x",
                    f"{row['decode_tokens_per_s']:.1f}",
                    f"{row['decode_tokens_per_s'] / stock['decode_tokens_per_s']:.2f}x",
                    f"{row['generate_s']:.2f}",
                    f"{stock['generate_s'] / row['generate_s']:.2f}x",
                    f"{row['peak_memory_bytes'] / 2**20:.0f}",
                    f"{row['kv_cache_bytes'] / 2**20:.1f}",
                    _per_layer_kv(row),
                    f"{row['padding_fraction']:.1%}",
                    overhead,
                ]
            )
        parts.append(
            f"### Batch {batch_size}" + (" (each image alone; means over the images)" if batch_size == 1 else "")
        )
        parts.append(
            markdown_table(
                [
                    "variant",
                    "target",
                    "kept: mean (range)",
                    "first token ms",
                    "speedup",
                    "decode tok/s",
                    "speedup",
                    "generate s",
                    "speedup",
                    "peak MiB",
                    "KV MiB",
                    "KV MiB per layer",
                    "padding",
                    "overhead",
                ],
                table,
            )
        )
    batch_size = max(results["setting"]["batch_sizes"])
    if batch_size > 1:
        rows = _rows_by(results, batch_size)
        parts.append(f"### Per-image budgets against a fixed budget in batches of {batch_size} (the cost of padding)")
        parts.append(
            markdown_table(
                [
                    "target",
                    f"{SUBJECT} images/s",
                    f"{BASELINE} images/s",
                    f"{SUBJECT} / {BASELINE}",
                    f"{SUBJECT} padding",
                ],
                [
                    [
                        target,
                        f"{batch_size / rows[(SUBJECT, target)]['generate_s']:.2f}",
                        f"{batch_size / rows[(BASELINE, target)]['generate_s']:.2f}",
                        f"{rows[(BASELINE, target)]['generate_s'] / rows[(SUBJECT, target)]['generate_s']:.2f}x",
                        f"{rows[(SUBJECT, target)]['padding_fraction']:.1%}",
                    ]
                    for target in results["setting"]["targets"]
                ],
            )
        )
    return "\n\n".join(parts)


def _per_layer_kv(row: dict[str, Any]) -> str:
    """KV MiB of one layer, or of the first and the last layer when in-LLM pruning makes them differ."""
    per_layer = row["kv_cache_bytes_per_layer"]
    if per_layer[0] == per_layer[-1]:
        return f"{per_layer[0] / 2**20:.2f}"
    return f"{per_layer[0] / 2**20:.2f} / {per_layer[-1] / 2**20:.2f}"


def _solvers_markdown(solvers: dict[str, Any], machine: dict[str, Any]) -> str:
    where = machine["gpu"] or f"{machine['torch_threads']} CPU threads"
    timing = markdown_table(
        ["matrix", "solver", "batch", "ms per call", "ms per image"],
        [
            [
                f"{row['tokens']}x{row['channels']}",
                row["solver"],
                row["batch"],
                f"{row['seconds'] * 1e3:.1f}",
                f"{row['ms_per_image']:.1f}",
            ]
            for row in solvers["timings"]
        ],
    )
    errors = markdown_table(
        ["tokens", "energy ratio", "mean exact budget", "mean abs error", "max abs error", "mean signed error"],
        [
            [
                row["tokens"],
                f"{row['energy_ratio']:.4f}",
                f"{row['mean_exact_budget']:.1f}",
                f"{row['mean_abs_error']:.2f}",
                f"{row['max_abs_error']:.0f}",
                f"{row['mean_signed_error']:+.2f}",
            ]
            for row in solvers["errors"]
        ],
    )
    return (
        f"## Budget computation alone\n\nfloat32 on {where}: centring, spectrum, energy curve and budgets, with the "
        f"host sync; median over repeats after a warm-up. Matrices are the benchmark images' vision features; the "
        f"{SOLVER_TOKEN_MULTIPLES[-1]}x taller ones stack {SOLVER_TOKEN_MULTIPLES[-1]} images' features (LLaVA-NeXT's "
        f"largest any-res layout).\n\n{timing}\n\nRandomized against exact budgets (no min_tokens clamp), over "
        f"{SOLVER_BATCH} matrices per size:\n\n{errors}"
    )


def _cost_markdown(cost: dict[str, Any]) -> str:
    table = markdown_table(
        [
            "model",
            "kept visual tokens",
            "prefill TFLOPs",
            "prefill ratio",
            "language-model ratio",
            "KV cache MiB (fp16)",
        ],
        [
            [
                row["model"],
                f"{row['kept']} of {row['visual_tokens']}",
                f"{row['prefill_flops'] / 1e12:.2f}",
                f"{row['prefill_ratio']:.2f}x",
                f"{row['language_model_ratio']:.2f}x",
                f"{row['kv_cache_bytes'] / 2**20:.0f}",
            ]
            for row in cost["table"]
        ],
    )
    return (
        f"## FLOPs and KV-cache model\n\nOne prompt with {cost['text_tokens']} text tokens; ratios are full over "
        f"pruned (the speedup FLOPs predict). See `adaprune/tools/cost_model.py` for what is counted.\n\n{table}"
    )


# --- plots --------------------------------------------------------------------------------------------------------

VARIANT_STYLES = {SUBJECT: "o-", BASELINE: "s-", "ideal": "^--"}


def _plot_end_to_end(results: dict[str, Any], path: Path) -> None:
    """Per batch size: time to first token, decode tokens/s and generate() time against mean kept tokens."""
    import matplotlib.pyplot as plt

    metrics = [
        ("time_to_first_token_s", "time to first token (s)"),
        ("decode_tokens_per_s", "decode tokens/s"),
        ("generate_s", "generate() time (s)"),
    ]
    batch_sizes = results["setting"]["batch_sizes"]
    figure, axes = plt.subplots(len(batch_sizes), len(metrics), figsize=(13, 3.6 * len(batch_sizes)), squeeze=False)
    for row_axes, batch_size in zip(axes, batch_sizes):
        rows = _rows_by(results, batch_size)
        stock = rows[("stock", None)]
        for axis, (field, label) in zip(row_axes, metrics):
            for variant in dict.fromkeys(name for name, target in rows if target is not None):
                points = sorted((row["mean_kept"], row[field]) for (name, _), row in rows.items() if name == variant)
                axis.plot(*zip(*points), VARIANT_STYLES.get(variant, "x-"), label=variant)
            axis.axhline(stock[field], color="black", linewidth=1, label=f"stock ({stock['mean_kept']:.0f} tokens)")
            if field == "time_to_first_token_s":
                points = sorted(
                    (
                        row["mean_kept"],
                        stock[field] * row["prefill_flops_per_prompt"] / stock["prefill_flops_per_prompt"],
                    )
                    for (name, _), row in rows.items()
                    if name == "ideal"
                )
                axis.plot(*zip(*points), ":", color="grey", label="stock x FLOPs ratio")
            axis.set_xlabel("mean kept visual tokens per image")
            axis.set_ylabel(label)
            axis.set_ylim(bottom=0)
            axis.set_title(f"batch {batch_size}")
            axis.grid(alpha=0.3)
        row_axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_solvers(solvers: dict[str, Any], path: Path) -> None:
    """Milliseconds per image of each solver, per matrix size and batch, against the 8 ms goal."""
    import matplotlib.pyplot as plt

    groups = sorted({(row["tokens"], row["channels"], row["batch"]) for row in solvers["timings"]})
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(SOLVERS)
    for offset, solver in enumerate(SOLVERS):
        values = {
            (row["tokens"], row["channels"], row["batch"]): row["ms_per_image"]
            for row in solvers["timings"]
            if row["solver"] == solver
        }
        axis.bar(
            [index + offset * width for index in range(len(groups))],
            [values[group] for group in groups],
            width,
            label=solver,
        )
    axis.axhline(8, color="red", linewidth=1, linestyle="--", label="goal: 8 ms per image")
    axis.set_xticks([index + width * (len(SOLVERS) - 1) / 2 for index in range(len(groups))])
    axis.set_xticklabels([f"{tokens}x{channels}\nbatch {batch}" for tokens, channels, batch in groups])
    axis.set_ylabel("ms per image")
    axis.set_title("budget computation alone (float32)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_cost_model(cost: dict[str, Any], path: Path) -> None:
    """Prefill TFLOPs and fp16 KV-cache MiB per prompt against the fraction of visual tokens kept."""
    import matplotlib.pyplot as plt

    figure, (flops_axis, kv_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for model in REFERENCE_MODELS:
        points = [row for row in cost["curves"] if row["model"] == model]
        label = f"{model} ({points[-1]['visual_tokens']} visual tokens)"
        fractions = [row["kept"] / row["visual_tokens"] for row in points]
        flops_axis.plot(fractions, [row["prefill_flops"] / 1e12 for row in points], label=label)
        kv_axis.plot(fractions, [row["kv_cache_bytes"] / 2**20 for row in points], label=label)
    for axis, label in ((flops_axis, "prefill TFLOPs per prompt"), (kv_axis, "KV cache MiB per prompt (fp16)")):
        axis.set_xlabel("fraction of visual tokens kept")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    flops_axis.legend(fontsize=8)
    figure.suptitle(f"analytical cost, {cost['text_tokens']} text tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _write_plots(results: dict[str, Any], output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    plots = []
    for key, name, plot in (
        ("end_to_end", "end_to_end.png", _plot_end_to_end),
        ("solvers", "budget_solvers.png", _plot_solvers),
        ("cost_model", "cost_model.png", _plot_cost_model),
    ):
        if key in results:
            plot(results if key == "end_to_end" else results[key], output_dir / name)
            plots.append(name)
    return plots


# --- command ------------------------------------------------------------------------------------------------------


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (`adaprune bench ...` or `python -m adaprune.tools.benchmark ...`), set by the entry point."""
    return getattr(args, "command_line", None) or shlex.join(["adaprune", *sys.argv[1:]])


def run(args: argparse.Namespace) -> int:
    """Runs the chosen sections and writes results.json, results.md and the plots; returns the exit code."""
    try:
        setting = _setting(args)
        device = _device(args)
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def log(message: str) -> None:
        print(message, flush=True)

    results: dict[str, Any] = {
        "command": _command_line(args),
        "quick": args.quick,
        "machine": machine_info(device),
        "setting": asdict(setting),
        "tokens_per_image": setting.geometry.tokens_per_image,
    }
    if {"e2e", "solver"} & set(args.sections):
        with tempfile.TemporaryDirectory() as directory:
            log(f"building the benchmark model in {directory} ...")
            checkpoint = save_tiny_llava(Path(directory) / "llava", setting.geometry)
            processor = LlavaProcessor.from_pretrained(checkpoint)
            stock = LlavaForConditionalGeneration.from_pretrained(checkpoint).to(device).eval()
            images = _benchmark_images(setting.geometry.image_size, setting.images)
            features = _vision_features(
                stock, processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
            )
            if "e2e" in args.sections:
                log("end to end:")
                results["end_to_end"] = _end_to_end(setting, checkpoint, processor, stock, images, device, log)
            if "solver" in args.sections:
                log("budget computation alone:")
                ratios = [
                    entry["energy_ratio"] for entry in results.get("end_to_end", {}).get("calibration", {}).values()
                ]
                results["solvers"] = _solvers(features, ratios, setting, device, log)
    if "cost" in args.sections:
        results["cost_model"] = _cost_model()
    results["load_average_1min_after"] = os.getloadavg()[0]

    (args.output_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    plots = _write_plots(results, args.output_dir)
    (args.output_dir / "results.md").write_text(_markdown(results, plots))
    log(f"wrote results.json, results.md and {len(plots)} plots to {args.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adaprune.tools.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(
        ["python", "-m", "adaprune.tools.benchmark", *(sys.argv[1:] if argv is None else argv)]
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
