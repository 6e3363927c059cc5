"""Signals read from the vision tower while it runs: the [CLS] attention at the feature layer, from the layer's own
query and key projections (hooks), so the tower stays on any attention backend; and the projector's input rebuilt
from the selected hidden states."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling


@dataclass(frozen=True)
class TowerFeatures:
    """Stock image features and how they were selected: the tower's output (the projected features in
    `pooler_output`, the selected hidden states), the feature layer(s) and select strategy in effect, and the
    images' sizes (any-resolution models)."""

    output: BaseModelOutputWithPooling
    layer: int | list[int]
    strategy: str
    image_sizes: torch.Tensor | None = None

    def projector_input(self) -> torch.Tensor:
        """The vision features LLaVA feeds its projector, rebuilt from the tower's selected hidden states."""
        layers = [self.layer] if isinstance(self.layer, int) else self.layer
        selected = [self.output.hidden_states[index] for index in layers]
        if self.strategy == "default":
            selected = [states[:, 1:] for states in selected]
        return torch.cat(selected, dim=-1)


def encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    for owner in (getattr(vision_tower, "vision_model", None), vision_tower):
        layers = getattr(getattr(owner, "encoder", None), "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"selector 'cls_attention' cannot find the encoder layers of vision tower {type(vision_tower).__name__}; "
        "use selector='uniform' with this model"
    )


def cls_attention_module(vision_tower: nn.Module, layer: int | list[int]) -> nn.Module:
    """The attention module whose output is hidden state `layer` (the deepest one if several are listed)."""
    tower_name = type(vision_tower).__name__
    embeddings = getattr(getattr(vision_tower, "vision_model", vision_tower), "embeddings", None)
    if getattr(embeddings, "class_embedding", None) is None:
        raise ValueError(
            f"selector 'cls_attention' needs a vision tower with a [CLS] token, and {tower_name} has none; "
            "use selector='uniform' with this model"
        )
    layers = encoder_layers(vision_tower)
    indices = [layer] if isinstance(layer, int) else layer
    hidden_index = max(index % (len(layers) + 1) for index in indices)
    if hidden_index == 0:
        raise ValueError(
            f"selector 'cls_attention' needs an attention layer before vision_feature_layer={layer!r}, which is the "
            "embedding output; use selector='uniform' with this layer"
        )
    attention = getattr(layers[hidden_index - 1], "self_attn", None)
    if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "head_dim", "scale")):
        raise ValueError(
            f"selector 'cls_attention' cannot read queries and keys from {tower_name}'s attention layers; "
            "use selector='uniform' with this model"
        )
    return attention


def cls_attention_scores(attention: nn.Module, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Attention of the [CLS] query (token 0) to every token, averaged over heads, from the layer's projected
    queries and keys (n, T, C): -> (n, T) float32."""
    batch, length = keys.shape[:2]
    query = queries[:, :1].reshape(batch, 1, -1, attention.head_dim).transpose(1, 2)
    key = keys.reshape(batch, length, -1, attention.head_dim).transpose(1, 2)
    logits = (query.float() @ key.float().mT) * attention.scale
    return logits.softmax(-1).mean(1).squeeze(1)


@contextmanager
def capturing_cls_attention(attention: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Records the [CLS] attention of `attention` while the tower runs under any attention backend (e.g. SDPA).

    Hooks on the layer's own query and key projections take their outputs as they are computed, so the scores
    cost one (1 x T) product per head instead of a second pass through the projections.
    """
    captured: dict[str, torch.Tensor] = {}
    projections: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            projections[name] = (output[:, :1] if name == "queries" else output).detach()
            if projections.keys() == {"queries", "keys"}:
                with torch.no_grad():
                    captured["cls_attention"] = cls_attention_scores(attention, **projections)
                projections.clear()

        return record

    handles = [
        attention.q_proj.register_forward_hook(recorder("queries")),
        attention.k_proj.register_forward_hook(recorder("keys")),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
