"""The FLOPs and KV-cache model (`adaprune.tools.cost_model`) against hand-computed values and real module shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaModel

from adaprune.tools.cost_model import (
    CLIP_VIT_L_336,
    LLAVA_15_7B,
    LLAVA_NEXT_8B,
    LanguageModelGeometry,
    VisionTowerGeometry,
    decode_flops,
    decoder_linear_flops,
    kv_cache_bytes,
    language_model_prefill_flops,
    llava_prefill_flops,
    vision_flops,
)

# hidden 8, 2 layers, MLP 16, 2 query heads of width 4 sharing 1 key/value head, vocabulary 10.
TINY_LM = LanguageModelGeometry(
    hidden_size=8, num_layers=2, intermediate_size=16, num_heads=2, num_kv_heads=1, vocab_size=10
)
# width 4, 1 layer, MLP 8, 4x4 px images in 2x2 px patches (4 patches + [CLS]), projector to width 6.
TINY_VISION = VisionTowerGeometry(
    hidden_size=4, num_layers=1, intermediate_size=8, image_size=4, patch_size=2, projector_output=6
)


def test_tiny_language_model_by_hand() -> None:
    # Per layer and token: q, o 8x8 each, k, v 8x4 each, MLP 3 x 8x16 -> 2 * (128 + 64 + 384) = 1152 FLOPs; 2 layers.
    assert decoder_linear_flops(TINY_LM, 5) == 5 * 2 * 1152
    # Prefill of 5 tokens: 15 causal pairs x 4 FLOPs x 2 heads x 4 dims x 2 layers = 960; LM head 2 * 8 * 10 = 160.
    assert language_model_prefill_flops(TINY_LM, 5) == 11520 + 960 + 160
    # One token after 5 cached: 6 pairs -> 384 attention FLOPs.
    assert decode_flops(TINY_LM, 5) == 2304 + 384 + 160
    # Keys and values: 2 x 2 layers x 1 head x 4 dims x 5 tokens x 2 bytes.
    assert kv_cache_bytes(TINY_LM, 5) == 160
    assert kv_cache_bytes(TINY_LM, 5, bytes_per_value=4) == 320


def test_per_layer_lengths_by_hand() -> None:
    # Layer 0 on 5 tokens: 5760 linear + 480 attention; layer 1 on 3 tokens: 3 * 1152 + 6 pairs x 32 = 3456 + 192.
    assert language_model_prefill_flops(TINY_LM, [5, 3]) == 5760 + 480 + 3456 + 192 + 160
    assert language_model_prefill_flops(TINY_LM, [5, 5]) == language_model_prefill_flops(TINY_LM, 5)
    with pytest.raises(ValueError, match=r"one length per layer \(2\), got 3"):
        language_model_prefill_flops(TINY_LM, [5, 4, 3])


def test_tiny_vision_tower_and_whole_prefill_by_hand() -> None:
    # Patch embedding 2 * 4 patches * (3 * 2 * 2) * 4 = 384; a layer on 5 tokens: 2 * 5 * (4 * 16 + 2 * 4 * 8) = 1280
    # plus 4 * 4 * 25 = 400 for bidirectional attention; projector 2 * 4 * (4 * 6 + 6 * 6) = 480.
    assert vision_flops(TINY_VISION) == 384 + 1680 + 480
    # Two views through the tower, then 3 visual + 2 text tokens through the language model.
    assert llava_prefill_flops(TINY_LM, TINY_VISION, visual_tokens=3, text_tokens=2, views=2) == 2 * 2544 + 12640


def test_llava_15_7b_kv_cache_is_half_a_mebibyte_per_token() -> None:
    """32 layers x 32 heads x 128 dims, keys and values in fp16: 512 KiB a token, 288 MiB for 576 tokens."""
    assert kv_cache_bytes(LLAVA_15_7B, 1) == 512 * 1024
    assert kv_cache_bytes(LLAVA_15_7B, 576) == 288 * 1024**2
    # Llama-3-8B shares each key/value head among 4 query heads: a quarter of that.
    assert kv_cache_bytes(LLAVA_NEXT_8B, 576) == 72 * 1024**2


def _linear_weights(module: torch.nn.Module) -> int:
    return sum(layer.weight.numel() for layer in module.modules() if isinstance(layer, torch.nn.Linear))


@pytest.mark.parametrize("geometry", [LLAVA_15_7B, LLAVA_NEXT_8B], ids=["llava-1.5-7b", "llava-next-8b"])
def test_linear_flops_are_twice_the_decoder_weights(geometry: LanguageModelGeometry) -> None:
    """Independent of the formula: each weight of a real Llama decoder is one multiply-add per token."""
    config = LlamaConfig(
        hidden_size=geometry.hidden_size,
        num_hidden_layers=geometry.num_layers,
        intermediate_size=geometry.intermediate_size,
        num_attention_heads=geometry.num_heads,
        num_key_value_heads=geometry.num_kv_heads,
        vocab_size=geometry.vocab_size,
    )
    with torch.device("meta"):
        model = LlamaModel(config)
    assert decoder_linear_flops(geometry, 3) == 3 * 2 * _linear_weights(model.layers)


def test_vision_layers_match_a_real_clip_tower() -> None:
    """The per-layer weight FLOPs of CLIP ViT-L/14-336 equal twice its layers' weights per token."""
    config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    with torch.device("meta"):
        tower = CLIPVisionModel(config)
    tokens = CLIP_VIT_L_336.patches + 1
    width = CLIP_VIT_L_336.hidden_size
    attention = CLIP_VIT_L_336.num_layers * 4 * width * tokens**2
    patch_embedding = 2 * CLIP_VIT_L_336.patches * tower.embeddings.patch_embedding.weight.numel()
    projector = 2 * CLIP_VIT_L_336.patches * (1024 * 4096 + 4096 * 4096)
    layers = 2 * tokens * _linear_weights(tower.encoder)
    assert vision_flops(CLIP_VIT_L_336) == patch_embedding + layers + attention + projector


def test_fewer_visual_tokens_cost_less_and_vision_does_not_shrink() -> None:
    full = llava_prefill_flops(LLAVA_15_7B, CLIP_VIT_L_336, 576, 40)
    pruned = llava_prefill_flops(LLAVA_15_7B, CLIP_VIT_L_336, 64, 40)
    assert pruned < full
    assert full - pruned == language_model_prefill_flops(LLAVA_15_7B, 616) - language_model_prefill_flops(
        LLAVA_15_7B, 104
    )
