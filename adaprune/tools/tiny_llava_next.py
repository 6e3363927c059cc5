"""Small LLaVA-NeXT checkpoints built locally, with no network, for tests and the demo.

The geometry is LLaVA-NeXT's (336 px crops, patch 14, 576 tokens per crop, llava-hf's grid pinpoints), so images
of different aspect ratios get real any-resolution layouts (base crop, 2-3 grid crops, unpadding, one newline
token per grid row); only the widths and depths are tiny. Weights are seeded and random.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from .tiny_llava import Geometry, build_tokenizer, prepare_stock_weights, tower_and_text_configs

LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
NEXT_GEOMETRY = replace(
    Geometry(image_size=336, patch_size=14, vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64),
    text_hidden=64,
)


def build_next_processor(geometry: Geometry = NEXT_GEOMETRY) -> LlavaNextProcessor:
    """A stock `LlavaNextProcessor` (any-resolution crops, placeholders per packed visual token)."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": geometry.image_size},
        crop_size={"height": geometry.image_size, "width": geometry.image_size},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=geometry.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_next_config(processor: LlavaNextProcessor, geometry: Geometry = NEXT_GEOMETRY) -> LlavaNextConfig:
    """A stock `LlavaNextConfig` matching the processor's tokenizer and the geometry."""
    vision, text = tower_and_text_configs(processor.tokenizer, geometry, max_positions=8192)
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_seq_length=geometry.tokens_per_image,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_stock_next_model(config: LlavaNextConfig, seed: int = 0) -> LlavaNextForConditionalGeneration:
    """Stock LLaVA-NeXT with seeded random weights, prepared like the tiny LLaVA (see `prepare_stock_weights`)."""
    return prepare_stock_weights(LlavaNextForConditionalGeneration, config, seed)


def save_tiny_llava_next(directory: str | Path, geometry: Geometry = NEXT_GEOMETRY, seed: int = 0) -> Path:
    """Writes a stock llava-hf style LLaVA-NeXT checkpoint (weights, config, processor) and returns its path."""
    directory = Path(directory)
    processor = build_next_processor(geometry)
    build_stock_next_model(build_next_config(processor, geometry), seed=seed).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def aspect_ratio_images(seed: int = 0) -> dict[str, Image.Image]:
    """Images whose sizes select different grids: wide (1x2 crops), tall (2x1), large (2x2), square (1x2), panorama."""
    rng = np.random.default_rng(seed)
    sizes = {"wide": (600, 300), "tall": (280, 560), "large": (800, 500), "square": (336, 336), "panorama": (960, 250)}
    images = {}
    for index, (name, (width, height)) in enumerate(sizes.items()):
        y, x = np.mgrid[0:height, 0:width] / max(width, height)
        waves = np.sin((index + 2) * np.pi * x[..., None] * [1, 2, 3]) * np.cos((index + 1) * np.pi * y[..., None])
        noise = rng.normal(0, 0.15 * index, (height, width, 3))
        pixels = np.clip(127 + 100 * waves + 255 * noise, 0, 255).astype(np.uint8)
        images[name] = Image.fromarray(pixels)
    return images
