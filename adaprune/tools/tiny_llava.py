"""Small LLaVA checkpoints and sample images built locally, with no network.

Used by the tests and the demo: a word-level tokenizer, a stock `LlavaProcessor`, a stock
`LlavaForConditionalGeneration` with seeded random weights, and synthetic images of clearly different density.
`LLAVA15_GEOMETRY` has LLaVA-1.5's vision geometry (336 px, patch 14, 576 tokens, width 1024) with few layers. The
built-in trained model is built from the same pieces (`builtin_llava.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ModelT = TypeVar("ModelT", bound=PreTrainedModel)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
WORDS = (
    "USER: ASSISTANT: what is in the image ? describe this picture compare two images a an of and with on "
    "red green blue black white sky sea tree city street dog cat car house people many few one plain busy "
    "texture pattern lines dots colour left right top bottom small large is are there it shows"
).split()


@dataclass(frozen=True)
class Geometry:
    """Sizes of a tiny LLaVA: vision tower, projector and language model."""

    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 128
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 128
    # None: the tokenizer's size; a larger vocabulary sizes the embedding and LM head like a real model's.
    text_vocab: int | None = None

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SMALL_GEOMETRY = Geometry()
LLAVA15_GEOMETRY = Geometry(
    image_size=336, patch_size=14, vision_hidden=1024, vision_layers=2, vision_heads=16, vision_intermediate=1024
)


# LLaVA-1.5's conversation format: "USER: <image>\n{text} ASSISTANT:" (images first, then the text of the turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tokenizer(words: Sequence[str] = WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of `words` with LLaVA's special tokens; pads on the left, adds <s>."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def build_processor(
    geometry: Geometry = SMALL_GEOMETRY, words: Sequence[str] = WORDS, chat_template: str | None = None
) -> LlavaProcessor:
    """A stock `LlavaProcessor` that expands each <image> into the tower's patch count, as llava-hf's do."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": geometry.image_size},
        crop_size={"height": geometry.image_size, "width": geometry.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(words),
        patch_size=geometry.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def tower_and_text_configs(
    tokenizer: PreTrainedTokenizerFast, geometry: Geometry, max_positions: int = 4096
) -> tuple[CLIPVisionConfig, LlamaConfig]:
    """A CLIP vision tower and a Llama language model of the geometry's sizes, for the tokenizer's vocabulary
    (or the geometry's larger `text_vocab`)."""
    if geometry.text_vocab is not None and geometry.text_vocab < len(tokenizer):
        raise ValueError(
            f"text_vocab must be at least the tokenizer's {len(tokenizer)} tokens, got {geometry.text_vocab}; "
            "use None for the tokenizer's size"
        )
    vision = CLIPVisionConfig(
        image_size=geometry.image_size,
        patch_size=geometry.patch_size,
        hidden_size=geometry.vision_hidden,
        intermediate_size=geometry.vision_intermediate,
        num_hidden_layers=geometry.vision_layers,
        num_attention_heads=geometry.vision_heads,
        projection_dim=geometry.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=geometry.text_vocab or len(tokenizer),
        hidden_size=geometry.text_hidden,
        intermediate_size=geometry.text_intermediate,
        num_hidden_layers=geometry.text_layers,
        num_attention_heads=geometry.text_heads,
        num_key_value_heads=geometry.text_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return vision, text


def build_config(processor: LlavaProcessor, geometry: Geometry = SMALL_GEOMETRY) -> LlavaConfig:
    """A stock `LlavaConfig` matching the processor's tokenizer and the geometry."""
    vision, text = tower_and_text_configs(processor.tokenizer, geometry)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=processor.image_token_id,
        image_seq_length=geometry.tokens_per_image,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def smooth_position_embeddings(grid: int, width: int, amplitude: float = 0.02) -> torch.Tensor:
    """Low-frequency 2-D sinusoids for the patch positions (and zeros for [CLS]), like a trained ViT's.

    Random position embeddings would give every patch of a plain image its own random direction, so a plain
    image would look dense; smooth ones let the features reflect the image content, as in a real CLIP.
    """
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], -1).float() / grid
    generator = torch.Generator().manual_seed(grid)
    directions = torch.randn(4, width, generator=generator) / width**0.5
    waves = torch.cat([torch.sin(torch.pi * coords), torch.cos(torch.pi * coords)], -1)
    patches = amplitude * (waves @ directions) * width**0.5
    return torch.cat([torch.zeros(1, width), patches])


def prepare_stock_weights(
    model_class: type[ModelT], config: PretrainedConfig, seed: int, logit_scale: float = 20.0
) -> ModelT:
    """A stock model with seeded random weights, smooth vision position embeddings and a sharpened LM head
    (`logit_scale`, so greedy choices are not ties), generating with padding and without an EOS stop."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    vision = config.vision_config
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
        tower = model.model.vision_tower
        embeddings = getattr(tower, "vision_model", tower).embeddings.position_embedding.weight
        embeddings.copy_(smooth_position_embeddings(vision.image_size // vision.patch_size, vision.hidden_size))
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = None
    return model


def build_stock_model(config: LlavaConfig, seed: int = 0, logit_scale: float = 20.0) -> LlavaForConditionalGeneration:
    """Stock LLaVA with seeded random weights (see `prepare_stock_weights`)."""
    return prepare_stock_weights(LlavaForConditionalGeneration, config, seed, logit_scale)


def save_tiny_llava(directory: str | Path, geometry: Geometry = SMALL_GEOMETRY, seed: int = 0) -> Path:
    """Writes a stock llava-hf style checkpoint (weights, config, processor) and returns its path."""
    directory = Path(directory)
    processor = build_processor(geometry)
    model = build_stock_model(build_config(processor, geometry), seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def sample_images(size: int = 336, seed: int = 0) -> dict[str, Image.Image]:
    """Synthetic images from plain to busy: a flat colour, a soft gradient, a few shapes, and dense noise."""
    rng = np.random.default_rng(seed)
    plain = Image.new("RGB", (size, size), (90, 140, 200))
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    gradient = Image.fromarray(
        np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.full((size, size), 128.0)], -1).astype(
            np.uint8
        )
    )
    shapes = Image.new("RGB", (size, size), (240, 240, 230))
    draw = ImageDraw.Draw(shapes)
    for _ in range(6):
        x, y = rng.integers(0, size - 60, 2)
        draw.ellipse([int(x), int(y), int(x) + 60, int(y) + 60], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    busy = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return {"plain": plain, "gradient": gradient, "shapes": shapes, "busy": busy}
