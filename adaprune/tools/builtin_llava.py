"""The built-in model: a small LLaVA-1.5 trained on the synthetic visual-question task, shipped with the package.

Layout as LLaVA-1.5 (a CLIP vision tower with a [CLS] token, features from its second-to-last layer, the two-layer
GELU projector, a Llama language model) at toy size: 192 px images in 16-pixel patches (144 visual tokens), a
3-layer 96-wide tower and a 4-layer 128-wide Llama, about 1.3 M parameters. `python -m adaprune.tools.train_builtin`
trains it from a seed (see that module); the weights and the processor live in `adaprune/tools/builtin_llava/`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlavaProcessor

from . import synthetic_vqa
from .tiny_llava import CHAT_TEMPLATE, Geometry, build_processor

BUILTIN_GEOMETRY = Geometry(
    image_size=synthetic_vqa.IMAGE_SIZE,
    patch_size=synthetic_vqa.CELL,
    vision_hidden=96,
    vision_layers=3,
    vision_heads=4,
    vision_intermediate=384,
    text_hidden=128,
    text_layers=4,
    text_heads=4,
    text_intermediate=384,
)
BUILTIN_DIRECTORY = Path(__file__).parent / "builtin_llava"


def build_builtin_processor() -> LlavaProcessor:
    """The built-in model's processor: the task's words, LLaVA-1.5's prompt format, 192 px images."""
    return build_processor(BUILTIN_GEOMETRY, synthetic_vqa.vocabulary(), CHAT_TEMPLATE)


def builtin_checkpoint() -> Path:
    """The directory of the shipped, trained checkpoint (a stock llava-hf layout)."""
    if not (BUILTIN_DIRECTORY / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the built-in model's weights are missing from {BUILTIN_DIRECTORY}; reinstall adaprune, or train them "
            "with `python -m adaprune.tools.train_builtin`"
        )
    return BUILTIN_DIRECTORY
