"""Attention cues inside the language model, read without eager attention: how much chosen query positions (the
prompt's last token, the question's tokens) attend to every position at one decoder layer, from that layer's own
keys after RoPE and just those query rows recomputed from the layer's input, so the model stays on SDPA (or any
other backend)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def attention_module(layer: nn.Module, index: int) -> nn.Module:
    """The self-attention of decoder layer `index`, checked to expose what the cue is computed from."""
    attention = getattr(layer, "self_attn", None)
    if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "head_dim", "scaling")):
        raise ValueError(
            f"in-LLM pruning reads the attention of decoder layer {index} from its q_proj and k_proj, which "
            f"{type(layer).__name__} does not expose; use a vision-stage selector ('cls_attention', 'uniform')"
        )
    return attention


def rotary_function(attention: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The model family's own `apply_rotary_pos_emb`, from the module that defines its attention class."""
    function = getattr(inspect.getmodule(type(attention)), "apply_rotary_pos_emb", None)
    if function is None:
        raise ValueError(
            f"in-LLM pruning applies {type(attention).__name__}'s rotary embedding to its keys, but its module has no "
            "apply_rotary_pos_emb; use a vision-stage selector ('cls_attention', 'uniform')"
        )
    return function


def _heads(attention: nn.Module, projected: torch.Tensor, norm: str) -> torch.Tensor:
    """(B, T, heads * head_dim) projections as (B, heads, T, head_dim), through the family's q/k norm if any."""
    states = projected.view(*projected.shape[:2], -1, attention.head_dim)
    if isinstance(getattr(attention, norm, None), nn.Module):
        states = getattr(attention, norm)(states)
    return states.transpose(1, 2)


def query_attention(
    attention: nn.Module,
    query_inputs: torch.Tensor,
    query_index: torch.LongTensor,
    keys: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    padding_mask: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of chosen query positions to every position, per head: (B, heads, Q, L) float32.

    query_inputs: (B, Q, D) the layer's attention input at the `query_index` (B, Q) positions; keys: (B, L, kv
    heads * head_dim) its key projections; position_embeddings: the (cos, sin) the layer received; padding_mask:
    (B, L), 0 at padding. Each query sees the real positions up to its own (causal), as in the layer.
    """
    rotate = rotary_function(attention)
    batch, length = padding_mask.shape
    cos, sin = (table.expand(batch, -1, -1) for table in position_embeddings)
    at_queries = query_index.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
    query = _heads(attention, attention.q_proj(query_inputs), "q_norm")
    key = _heads(attention, keys, "k_norm")
    query = rotate(query, query, cos.gather(1, at_queries), sin.gather(1, at_queries))[0]
    key = rotate(key, key, cos, sin)[1]
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = (query.float() @ key.float().mT) * attention.scaling
    visible = padding_mask.bool().unsqueeze(1) & (
        torch.arange(length, device=query_index.device) <= query_index.unsqueeze(-1)
    )
    return logits.masked_fill(~visible.unsqueeze(1), float("-inf")).softmax(-1)


def hidden_states_argument(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a layer or attention module is called with, by keyword or as its first argument."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@contextmanager
def capturing_query_attention(
    attention: nn.Module, queries: Callable[[], tuple[torch.Tensor, torch.LongTensor]]
) -> Iterator[dict[str, torch.Tensor]]:
    """Records `"attention"` (B, heads, Q, L), the attention probabilities of chosen query positions at
    `attention`'s layer, each time it runs: `queries()` gives the batch's padding mask (B, L) and the (B, Q) query
    positions then. The layer's input rows at those positions and its rotary tables are read before it runs, its
    key projections as they are computed, the probabilities after it."""
    captured: dict[str, torch.Tensor] = {}
    parts: dict[str, Any] = {}

    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if kwargs.get("position_embeddings") is None:
            raise ValueError(
                f"in-LLM pruning needs the rotary tables that {type(module).__name__} receives as "
                "position_embeddings; this model family computes them elsewhere, use a vision-stage selector"
            )
        padding_mask, query_index = queries()
        inputs = hidden_states_argument(args, kwargs).detach()
        parts["query_inputs"] = inputs.gather(1, query_index.unsqueeze(-1).expand(-1, -1, inputs.shape[-1]))
        parts.update(query_index=query_index, padding_mask=padding_mask)
        parts["position_embeddings"] = kwargs["position_embeddings"]

    def keys(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        parts["keys"] = output.detach()

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        with torch.no_grad():
            captured["attention"] = query_attention(module, **parts)
        parts.clear()

    handles = [
        attention.register_forward_pre_hook(before, with_kwargs=True),
        attention.k_proj.register_forward_hook(keys),
        attention.register_forward_hook(after),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
