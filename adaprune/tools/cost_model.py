"""Analytical prefill FLOPs and KV-cache bytes of a LLaVA model against the number of visual tokens it keeps.

Pure functions of the geometry, so measured speedups can be set against the theoretical ones. Conventions:

* one multiply-add is 2 FLOPs; only matrix products are counted (norms, softmax, activations, RoPE and the
  residual adds are lower order and left out);
* the language model is a Llama-style decoder: q/k/v/o projections (grouped-query attention when
  ``num_kv_heads < num_heads``) and a gated MLP of three ``hidden x intermediate`` matrices;
* decoder attention is causal: a query at position p attends to p + 1 keys, so a prefill of n tokens scores
  n (n + 1) / 2 query-key pairs, each costing 2 * head_dim FLOPs per head for the scores and as much for the
  weighted sum of values;
* the LM head runs on the last position only at prefill (``logits_to_keep=1``, as ``generate()`` does);
* the vision tower (CLIP ViT) runs every layer on all patches plus [CLS] with bidirectional attention, then a
  two-layer projector maps each patch to the language model's width. Pruning happens after the projector, so
  the vision part does not shrink with the kept tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LanguageModelGeometry:
    """Sizes of a Llama-style decoder; ``head_dim`` defaults to ``hidden_size // num_heads``."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int | None = None

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass(frozen=True)
class VisionTowerGeometry:
    """Sizes of a CLIP-style vision tower and of the projector output (the language model's width)."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    image_size: int
    patch_size: int
    projector_output: int

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# The language models of LLaVA-1.5-7B/13B (Vicuna-7B/13B v1.5; vocabulary with llava-hf's two added tokens, as in
# tests/data/llava-1.5-7b-hf/config.json) and of LLaVA-NeXT-8B (Llama-3-8B, grouped-query attention).
LLAVA_15_7B = LanguageModelGeometry(4096, 32, 11008, 32, 32, 32064)
LLAVA_15_13B = LanguageModelGeometry(5120, 40, 13824, 40, 40, 32064)
LLAVA_NEXT_8B = LanguageModelGeometry(4096, 32, 14336, 32, 8, 128256)
CLIP_VIT_L_336 = VisionTowerGeometry(1024, 24, 4096, 336, 14, projector_output=4096)
# LLaVA-NeXT's largest any-res layout: a base view and 4 crops of 576 patches each.
LLAVA_NEXT_MAX_VISUAL_TOKENS = 5 * 576


def decoder_linear_flops(lm: LanguageModelGeometry, tokens: int) -> int:
    """FLOPs of every decoder layer's weight matrices (attention projections and MLP) for `tokens` tokens."""
    query_width = lm.num_heads * lm.attention_head_dim
    kv_width = lm.num_kv_heads * lm.attention_head_dim
    per_token = 2 * (
        2 * lm.hidden_size * query_width + 2 * lm.hidden_size * kv_width + 3 * lm.hidden_size * lm.intermediate_size
    )
    return lm.num_layers * per_token * tokens


def causal_attention_flops(lm: LanguageModelGeometry, new_tokens: int, past_tokens: int = 0) -> int:
    """FLOPs of scores and weighted values for `new_tokens` queries after `past_tokens` cached ones, all layers."""
    pairs = new_tokens * past_tokens + new_tokens * (new_tokens + 1) // 2
    return lm.num_layers * 4 * lm.num_heads * lm.attention_head_dim * pairs


def lm_head_flops(lm: LanguageModelGeometry, positions: int = 1) -> int:
    """FLOPs of the output projection to the vocabulary at `positions` positions."""
    return 2 * lm.hidden_size * lm.vocab_size * positions


def language_model_prefill_flops(lm: LanguageModelGeometry, lengths: int | Sequence[int]) -> int:
    """FLOPs of one prefill, with logits at the last position only: `lengths` tokens in every layer, or per layer
    (in-LLM pruning shortens the sequence from its cut layers on)."""
    if isinstance(lengths, int):
        return decoder_linear_flops(lm, lengths) + causal_attention_flops(lm, lengths) + lm_head_flops(lm)
    if len(lengths) != lm.num_layers:
        raise ValueError(f"expected one length per layer ({lm.num_layers}), got {len(lengths)}")
    layer = replace(lm, num_layers=1)
    return sum(decoder_linear_flops(layer, n) + causal_attention_flops(layer, n) for n in lengths) + lm_head_flops(lm)


def decode_flops(lm: LanguageModelGeometry, context_length: int) -> int:
    """FLOPs of generating one token after `context_length` cached tokens."""
    return decoder_linear_flops(lm, 1) + causal_attention_flops(lm, 1, context_length) + lm_head_flops(lm)


def vision_flops(vision: VisionTowerGeometry) -> int:
    """FLOPs of the vision tower (patch embedding, every layer) and the projector for one image (or crop)."""
    patches = vision.patches
    tokens = patches + 1
    width = vision.hidden_size
    patch_embedding = 2 * patches * 3 * vision.patch_size**2 * width
    per_layer = 2 * tokens * (4 * width * width + 2 * width * vision.intermediate_size) + 4 * width * tokens * tokens
    projector = 2 * patches * (width * vision.projector_output + vision.projector_output**2)
    return patch_embedding + vision.num_layers * per_layer + projector


def llava_prefill_flops(
    lm: LanguageModelGeometry, vision: VisionTowerGeometry, visual_tokens: int, text_tokens: int, views: int = 1
) -> int:
    """FLOPs of a whole LLaVA prefill for one prompt: `views` images (or crops) through the vision tower, then
    the language model on `visual_tokens` kept visual tokens plus `text_tokens` text tokens."""
    return views * vision_flops(vision) + language_model_prefill_flops(lm, visual_tokens + text_tokens)


def kv_cache_bytes(lm: LanguageModelGeometry, tokens: int, bytes_per_value: int = 2) -> int:
    """Bytes of the keys and values cached for `tokens` tokens over all layers (2 bytes per value: fp16/bf16)."""
    return 2 * lm.num_layers * lm.num_kv_heads * lm.attention_head_dim * tokens * bytes_per_value
