"""Pruning inside the language model: at each of an in-LLM selector's cut layers, the visual tokens it drops leave
the sequence.

Everything goes through forward pre-hooks on the stock decoder layers (registered with their keyword arguments),
never through a copy of the language model's forward:

- prefill (`pruning_inside`): the attention of the layer before each cut is read (`decoder_probes`) while it
  runs; at the cut layer c the selector picks each unit's tokens, the hidden states are compacted
  (`CompactionPlan`, left re-padding, rows may keep different numbers), and layers from c on get the compacted
  rotary tables, position ids (kept tokens keep theirs) and an attention mask built for the shorter sequence by
  transformers' own mask function. Each layer's cache then holds the tokens present when it ran: every token
  below the first cut, fewer after each cut.
- later steps (`continuing_pruned_cache`): new tokens run through every layer; the layers of each cut's segment
  get the attention mask of their own, shorter cache (`PruningState.step_inputs` at the cut layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch
from torch import nn

from .anyres_layout import with_row_newlines
from .compat import causal_mask_for_layer
from .decoder_probes import attention_module, capturing_query_attention, hidden_states_argument
from .sequence_compaction import CompactionPlan, PruningState, left_compaction
from .settings import LanguageModelSelector, SingleCutSelector
from .token_selection import PatchGrid


@dataclass(frozen=True)
class ImageTokens:
    """Which image token each position of a (B, L) batch holds: `image` (its image, in batch order; -1 at other
    positions) and `token` (its index among that image's tokens)."""

    image: torch.LongTensor
    token: torch.LongTensor

    @classmethod
    def from_placeholders(cls, placeholders: torch.Tensor, tokens_per_image: Sequence[int]) -> ImageTokens:
        """From the (B, L) placeholder mask, whose placeholders hold the images' tokens in row-major order."""
        offsets = torch.tensor([0, *accumulate(tokens_per_image)], device=placeholders.device)
        slot = placeholders.flatten().long().cumsum(0).view_as(placeholders) - 1
        image = torch.bucketize(slot, offsets[1:], right=True)
        token = slot - offsets[image.clamp_max(len(tokens_per_image) - 1)]
        return cls(image=image.masked_fill(~placeholders, -1), token=token.masked_fill(~placeholders, -1))

    def compacted(self, plan: CompactionPlan) -> ImageTokens:
        return ImageTokens(image=plan.gather(self.image, pad_value=-1), token=plan.gather(self.token, pad_value=-1))

    def per_image(self, values: torch.Tensor, n_images: int, n_tokens: int, fill: float) -> torch.Tensor:
        """(B, L, ...) values at image positions as (n_images, n_tokens, ...), `fill` where an image lacks the
        token."""
        is_image = self.image >= 0
        flat = (self.image * n_tokens + self.token)[is_image]
        out = torch.full((n_images * n_tokens, *values.shape[2:]), fill, dtype=values.dtype, device=values.device)
        out[flat] = values[is_image]
        return out.view(n_images, n_tokens, *values.shape[2:])

    def kept_positions(self, keep: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) positions that stay: real tokens that are not images' tokens, and the kept ones of `keep`
        (n_images, n_tokens)."""
        is_image = self.image >= 0
        flat = (self.image * keep.shape[1] + self.token).clamp_min(0)
        return padding_mask.bool() & (~is_image | keep.flatten()[flat])


@dataclass(frozen=True)
class SelectionUnits:
    """The rows an in-LLM selector chooses in: budget units (a LLaVA image; a LLaVA-NeXT image or crop, as its
    `budget_scope` says), each with its budget.

    unit, slot: (n_images, P) the unit of each of the images' P tokens and its index there (-1: a token no
        selector chooses, such as a LLaVA-NeXT newline).
    budgets: (n_units,) tokens each unit keeps; n_slots: the longest unit's length.
    grid: where each unit's tokens sit on the patch grid (None: they are no grid).
    newline_rows: for LLaVA-NeXT's newline policy "keep_rows", the (n_images, P) grid row of each token and
        whether it is a newline: a newline stays when its row keeps a token.
    """

    unit: torch.LongTensor
    slot: torch.LongTensor
    budgets: torch.LongTensor
    n_slots: int
    grid: PatchGrid | None = None
    newline_rows: tuple[torch.LongTensor, torch.BoolTensor] | None = None

    @classmethod
    def whole_images(cls, budgets: torch.LongTensor, n_tokens: int, grid_side: int | None) -> SelectionUnits:
        """Each image one unit of its `n_tokens` tokens, on a `grid_side` square grid (None: no grid)."""
        n_images, device = len(budgets), budgets.device
        slot = torch.arange(n_tokens, device=device).expand(n_images, -1)
        unit = torch.arange(n_images, device=device).unsqueeze(1).expand(-1, n_tokens)
        grid = None if grid_side is None else PatchGrid.square(grid_side, n_images, device)
        return cls(unit=unit, slot=slot, budgets=budgets, n_slots=n_tokens, grid=grid)

    def _flat(self) -> tuple[torch.BoolTensor, torch.LongTensor]:
        chosen = self.unit >= 0
        return chosen, (self.unit * self.n_slots + self.slot)[chosen]

    def to_units(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """(n_images, P, ...) per-token values as (n_units, n_slots, ...), `fill` where a unit has no such slot."""
        chosen, flat = self._flat()
        out = torch.full(
            (len(self.budgets) * self.n_slots, *values.shape[2:]), fill, dtype=values.dtype, device=values.device
        )
        out[flat] = values[chosen]
        return out.view(len(self.budgets), self.n_slots, *values.shape[2:])

    def to_images(self, keep: torch.Tensor) -> torch.BoolTensor:
        """The units' (n_units, n_slots) keep mask as the images' (n_images, P) one, newlines as their policy says."""
        chosen, flat = self._flat()
        kept = torch.zeros_like(chosen)
        kept[chosen] = keep.flatten()[flat]
        if self.newline_rows is not None:
            kept = with_row_newlines(kept, *self.newline_rows)
        return kept


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    layers = getattr(language_model, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    raise ValueError(
        f"in-LLM pruning hooks the decoder layers of the language model, and {type(language_model).__name__} "
        "has no `layers` list; use a vision-stage selector ('cls_attention', 'uniform')"
    )


def check_cut_layers(text_config: Any, selector: LanguageModelSelector) -> tuple[int, ...]:
    """The selector's cut layers for this language model, checked: each has a layer before it (the cue) and is a
    decoder layer; from the first on, attention must be full (a sliding window counts cache entries, which
    pruning removes)."""
    n_layers = text_config.num_hidden_layers
    cuts = selector.cut_layers(n_layers)
    if not all(1 <= layer < n_layers for layer in cuts):
        if isinstance(selector, SingleCutSelector):
            raise ValueError(
                f"prune_layer must be a decoder layer after the first, 1 to {n_layers - 1} for this language model "
                f"of {n_layers} layers, got {selector.prune_layer}"
            )
        raise ValueError(
            f"selector {selector.name!r} cuts before decoder layers {list(cuts)}, which must lie in 1 to "
            f"{n_layers - 1} for this language model of {n_layers} layers"
        )
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        sliding = [index for index in range(cuts[0], n_layers) if layer_types[index] != "full_attention"]
    elif getattr(text_config, "sliding_window", None) is not None and getattr(text_config, "use_sliding_window", True):
        sliding = list(range(cuts[0], n_layers))
    else:
        sliding = []
    if sliding:
        raise ValueError(
            f"in-LLM pruning needs full attention from layer {cuts[0]} on (selector {selector.name!r}), but layers "
            f"{sliding} use a sliding window (it counts cache entries, which pruning removes); set "
            "text_config.sliding_window=None if prompts fit in the window, or use a vision-stage selector"
        )
    return cuts


def _with_hidden_states(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden, *args[1:]), kwargs


@contextmanager
def _layer_pre_hooks(
    layers: Sequence[nn.Module], first: int, rewrite: Callable[[int, tuple, dict], tuple[tuple, dict]]
) -> Iterator[None]:
    """`rewrite(index, args, kwargs)` replaces the inputs of every layer from `first` on."""
    handles = [
        layers[index].register_forward_pre_hook(
            lambda module, args, kwargs, index=index: rewrite(index, args, kwargs), with_kwargs=True
        )
        for index in range(first, len(layers))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LayerCuts:
    """What the prefill's cuts chose, by cut layer: which of the images' tokens stay from there on (n_images, P)
    and the compaction of the sequence the previous cut left; `record` is what the selector reported (e.g. a
    schedule)."""

    keeps: dict[int, torch.Tensor] = field(default_factory=dict)
    plans: dict[int, CompactionPlan] = field(default_factory=dict)
    record: dict[str, torch.Tensor] = field(default_factory=dict)


ATTENTION_SIGNALS = frozenset({"prompt_attention", "text_attention"})


def trailing_text_lengths(tokens: ImageTokens, padding_mask: torch.Tensor) -> torch.LongTensor:
    """(B,) per row of a left-padded batch, how many real tokens follow its last image token: the text rows, which
    end the row (at least its last position, so text-only rows and prompts ending on an image have one). Cuts drop
    only image tokens, so the counts hold at every cut of one prefill."""
    positions = torch.arange(padding_mask.shape[1], device=padding_mask.device)
    last_image = torch.where(tokens.image >= 0, positions, -1).amax(-1, keepdim=True)
    return (padding_mask.bool() & (positions > last_image)).sum(-1).clamp_min(1)


@contextmanager
def pruning_inside(
    language_model: nn.Module,
    selector: LanguageModelSelector,
    units: SelectionUnits,
    tokens: ImageTokens,
    padding_mask: torch.Tensor,
    cache: Any,
    image_signals: dict[str, torch.Tensor] | None = None,
    held_keeps: dict[int, torch.Tensor] | None = None,
) -> Iterator[LayerCuts]:
    """While the language model runs its prefill on a batch with `padding_mask` (B, L), drops at each of the
    selector's cut layers the visual tokens it does not keep (it chooses in each of the `units` within its budget;
    `tokens` says where the images' tokens are; `image_signals` holds (n_images, P) per-token values from the
    vision stage), or those `held_keeps` (n_images, P per cut layer) does not keep, when an earlier pass chose
    them. The `LayerCuts` fill in as the cut layers run."""
    layers = decoder_layers(language_model)
    cut_layers = check_cut_layers(language_model.config, selector)
    cuts = LayerCuts()
    segment: dict[str, Any] = {}
    current: dict[str, Any] = {"tokens": tokens, "padding_mask": padding_mask.bool()}
    captured: dict[int, dict[str, torch.Tensor]] = {}
    queries: dict[str, Any] = {}

    def rewrite(index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if index in cut_layers:
            args, kwargs = cut(index, args, {**kwargs, **segment})
        return args, {**kwargs, **segment}

    def cut(layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        layer_input = hidden_states_argument(args, kwargs)
        if held_keeps is not None:
            keep = held_keeps[layer]
        else:
            signals = layer_signals(layer, layer_input)
            chosen = selector.keep_at(layer, signals, units.budgets, cuts.record) & signals["present"]
            keep = units.to_images(chosen)
        plan = left_compaction(current["tokens"].kept_positions(keep, current["padding_mask"]))
        hidden = plan.gather(layer_input)
        batch_shape = current["padding_mask"].shape
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            position_ids = plan.gather(position_ids.expand(batch_shape))
        cos, sin = (plan.gather(table.expand(batch_shape[0], -1, -1)) for table in kwargs["position_embeddings"])
        segment.update(
            position_ids=position_ids,
            position_embeddings=(cos, sin),
            attention_mask=causal_mask_for_layer(
                language_model.config, hidden, plan.attention_mask, cache, position_ids, layer
            ),
        )
        current.update(tokens=current["tokens"].compacted(plan), padding_mask=plan.attention_mask.bool())
        cuts.keeps[layer], cuts.plans[layer] = keep, plan
        return _with_hidden_states(args, kwargs, hidden)

    def per_unit(values: torch.Tensor, fill: float) -> torch.Tensor:
        n_images, n_tokens = units.unit.shape
        return units.to_units(current["tokens"].per_image(values, n_images, n_tokens, fill), fill)

    def query_positions() -> tuple[torch.Tensor, torch.LongTensor]:
        """The current batch's padding mask and query positions: its last Q positions, those of each row's text
        (`queries["valid"]`), or the last one alone. Q is read on the host once per prefill."""
        padding = current["padding_mask"]
        length = padding.shape[1]
        if "lengths" not in queries:
            if "text_attention" in selector.required_signals:
                queries["lengths"] = trailing_text_lengths(current["tokens"], padding)
                queries["n_queries"] = int(queries["lengths"].max())
            else:
                queries["lengths"] = torch.ones(len(padding), dtype=torch.long, device=padding.device)
                queries["n_queries"] = 1
        index = torch.arange(length - queries["n_queries"], length, device=padding.device).expand(len(padding), -1)
        queries["valid"] = index >= length - queries["lengths"].unsqueeze(-1)
        return padding, index

    def layer_signals(layer: int, layer_input: torch.Tensor) -> dict[str, Any]:
        """What the selector reads at the cut before `layer`, per unit: the tokens present and what it requires."""
        required = selector.required_signals
        signals: dict[str, Any] = {"present": per_unit(current["padding_mask"], False), "n_layers": len(layers)}
        if required & ATTENTION_SIGNALS:
            attention = captured[layer - 1]["attention"]
            if "prompt_attention" in required:
                signals["prompt_attention"] = per_unit(attention[:, :, -1].mean(1), float("-inf"))
            if "text_attention" in required:
                valid = queries["valid"]
                rows = attention * valid[:, None, :, None]
                signals["text_attention"] = per_unit(rows.permute(0, 3, 1, 2), 0.0)
                row_counts = valid.sum(-1, keepdim=True).expand(current["padding_mask"].shape)
                signals["text_rows"] = per_unit(row_counts, 0).amax(-1)
        if "keys" in required:
            with torch.no_grad():
                keys = layers[layer].self_attn.k_proj(layer_input)
            signals["keys"] = per_unit(keys, 0.0)
        if "grid" in required:
            if units.grid is None:
                raise ValueError(
                    f"selector {selector.name!r} places each image's tokens on a square patch grid, and these "
                    "images' tokens are not one (vision_feature_select_strategy='full' adds the [CLS] token); use "
                    "the 'default' strategy or selector 'fastv'"
                )
            signals["grid"] = units.grid
        for name, values in (image_signals or {}).items():
            if name in required:
                signals[name] = units.to_units(values, 0.0)
        return signals

    with ExitStack() as stack:
        if held_keeps is None and selector.required_signals & ATTENTION_SIGNALS:
            for layer in cut_layers:
                captured[layer - 1] = stack.enter_context(
                    capturing_query_attention(attention_module(layers[layer - 1], layer - 1), query_positions)
                )
        stack.enter_context(_layer_pre_hooks(layers, cut_layers[0], rewrite))
        yield cuts


@contextmanager
def continuing_pruned_cache(
    language_model: nn.Module,
    state: PruningState,
    cache: Any,
    attention_mask: torch.Tensor | None,
    new_shape: tuple[int, int],
) -> Iterator[None]:
    """While the language model runs later steps on a cache filled by a pruned prefill, gives the layers of each
    in-LLM compaction the attention mask of their own cache (`attention_mask`: the caller's, over its full
    sequence)."""
    deeper = state.compactions[1:]
    if not deeper:
        yield
        return
    layers = decoder_layers(language_model)
    first_layers = [compaction.first_layer for compaction in deeper]
    segment_masks = {
        layer: state.step_inputs(attention_mask, None, new_shape, cache.get_seq_length(layer), layer)[0]
        for layer in first_layers
    }
    built: dict[int, Any] = {}

    def rewrite(index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        first = max(layer for layer in first_layers if layer <= index)
        if first not in built:
            built[first] = causal_mask_for_layer(
                language_model.config,
                hidden_states_argument(args, kwargs),
                segment_masks[first],
                cache,
                kwargs.get("position_ids"),
                first,
            )
        return args, {**kwargs, "attention_mask": built[first]}

    with _layer_pre_hooks(layers, first_layers[0], rewrite):
        yield
