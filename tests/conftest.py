"""Shared fixtures: tiny stock LLaVA and LLaVA-NeXT checkpoints built once per session, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path

import pytest
import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)

from adaprune.tools.tiny_llava import LLAVA15_GEOMETRY, SMALL_GEOMETRY, sample_images, save_tiny_llava
from adaprune.tools.tiny_llava_next import aspect_ratio_images, save_tiny_llava_next

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stock llava-hf style checkpoint, 112 px / patch 14 (64 tokens per image)."""
    return save_tiny_llava(tmp_path_factory.mktemp("small-llava"), SMALL_GEOMETRY)


@pytest.fixture(scope="session")
def llava15_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stock checkpoint with LLaVA-1.5 vision geometry: 336 px, patch 14, 576 tokens, width 1024, 2 layers."""
    return save_tiny_llava(tmp_path_factory.mktemp("llava15-geometry"), LLAVA15_GEOMETRY)


@pytest.fixture(scope="session")
def small_processor(small_checkpoint: Path) -> LlavaProcessor:
    return LlavaProcessor.from_pretrained(small_checkpoint)


@pytest.fixture(scope="session")
def small_stock(small_checkpoint: Path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(small_checkpoint).eval()


@pytest.fixture(scope="session")
def small_images() -> dict:
    return sample_images(SMALL_GEOMETRY.image_size)


@pytest.fixture(scope="session")
def llava15_images() -> dict:
    return sample_images(LLAVA15_GEOMETRY.image_size)


@pytest.fixture(scope="session")
def next_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stock llava-hf style LLaVA-NeXT checkpoint: 336 px crops, patch 14, llava-hf's grid pinpoints, tiny widths."""
    return save_tiny_llava_next(tmp_path_factory.mktemp("llava-next"))


@pytest.fixture(scope="session")
def next_processor(next_checkpoint: Path) -> LlavaNextProcessor:
    return LlavaNextProcessor.from_pretrained(next_checkpoint)


@pytest.fixture(scope="session")
def next_stock(next_checkpoint: Path) -> LlavaNextForConditionalGeneration:
    return LlavaNextForConditionalGeneration.from_pretrained(next_checkpoint).eval()


@pytest.fixture(scope="session")
def next_images() -> dict:
    """Images of different sizes and aspect ratios (different grids and unpadding)."""
    return aspect_ratio_images()
