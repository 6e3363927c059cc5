"""Pruning models loaded by checkpoint type, random prompts, and the oracle: the stock model fed the full sequence with the dropped image tokens masked out."""

from __future__ import annotations

import random
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor, PretrainedConfig
from typing_extensions import Self

from adaprune import AdaPruneLlavaForConditionalGeneration, AdaPruneLlavaNextForConditionalGeneration
from adaprune.compat import cache_argument, output_cache
from adaprune.configuration_adaprune import STOCK_MODEL_TYPES

TOLERANCE = 1e-4
NEW_TOKENS = 6
PRUNING_CLASSES = {
    model_type: model_class
    for model_class in (AdaPruneLlavaForConditionalGeneration, AdaPruneLlavaNextForConditionalGeneration)
    for model_type in (model_class.config_class.model_type, STOCK_MODEL_TYPES[model_class.config_class.model_type])
}


def load_pruned(checkpoint: Path, **settings):
    """The pruning model (LLaVA or LLaVA-NeXT, by the stock or converted checkpoint's model type) with the given
    pruning settings."""
    model_type = PretrainedConfig.get_config_dict(checkpoint)[0]["model_type"]
    return PRUNING_CLASSES[model_type].from_pretrained(checkpoint, **settings).eval()


WORDS = [
    "what",
    "is",
    "in",
    "the",
    "image",
    "?",
    "describe",
    "this",
    "picture",
    "a",
    "dog",
    "cat",
    "red",
    "sky",
    "city",
    "street",
    "many",
    "few",
]


def random_prompts(rng: random.Random, batch: int, max_images: int = 2) -> tuple[list[str], list[int]]:
    """Prompts of random length with 0..max_images <image> markers each (at least one image in the batch)."""
    while True:
        counts = [rng.randint(0, max_images) for _ in range(batch)]
        if sum(counts):
            break
    prompts = []
    for count in counts:
        words = ["USER:"] + [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
        for _ in range(count):
            words.insert(rng.randint(1, len(words)), "<image>")
        prompts.append(" ".join(words + ["ASSISTANT:"]))
    return prompts, counts


def dropped_placeholders(
    input_ids: torch.Tensor, image_token_id: int, kept_indices: list[torch.Tensor], tokens_per_image: list[int]
) -> torch.Tensor:
    """(B, L) mask of the image placeholders whose token was dropped, by walking placeholders in row-major order."""
    positions = [(row, col) for row, col in (input_ids == image_token_id).nonzero().tolist()]
    assert len(positions) == sum(tokens_per_image)
    dropped = torch.zeros_like(input_ids, dtype=torch.bool)
    start = 0
    for kept, count in zip(kept_indices, tokens_per_image):
        kept_set = set(kept.tolist())
        for token in range(count):
            if token not in kept_set:
                dropped[positions[start + token]] = True
        start += count
    return dropped


def oracle_inputs(inputs: dict, image_output, image_token_id: int, position_policy: str) -> dict:
    """The stock model's inputs for the oracle: full sequence, attention mask zeroed at dropped image tokens.

    Positions: "compact" is what stock `generate()` derives from that mask; "original" passes the positions of the
    unmasked sequence explicitly.
    """
    dropped = dropped_placeholders(
        inputs["input_ids"], image_token_id, image_output.kept_indices, image_output.tokens_per_image
    )
    mask = inputs["attention_mask"].masked_fill(dropped, 0)
    source_mask = mask if position_policy == "compact" else inputs["attention_mask"]
    positions = (source_mask.cumsum(-1) - 1).clamp_min(0)
    return {**inputs, "attention_mask": mask, "position_ids": positions}


def llava15_case(checkpoint: Path, images: dict) -> tuple[LlavaForConditionalGeneration, dict]:
    """The stock model of a LLaVA-1.5-geometry checkpoint and a left-padded batch of its processor: one prompt with
    one image, one with two (busy, plain, shapes)."""
    processor = LlavaProcessor.from_pretrained(checkpoint)
    stock = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    prompts = ["USER: <image> describe this picture ASSISTANT:", "USER: <image> and <image> compare ASSISTANT:"]
    pictures = [images["busy"], images["plain"], images["shapes"]]
    return stock, processor(images=pictures, text=prompts, padding=True, return_tensors="pt")


def max_abs_diff(first: Iterable[torch.Tensor], second: Iterable[torch.Tensor]) -> float:
    """Largest absolute difference over paired tensors."""
    return max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True))


def image_features(model, inputs: dict):
    """`get_image_features` on the processor's image inputs (LLaVA-NeXT also needs image_sizes)."""
    return model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes"))


def assert_matches_oracle(pruned, stock, inputs: dict):
    """The oracle: generate() and forward() of the pruning model equal the stock model (same weights) fed the full
    sequence with the attention mask zeroed at the dropped image tokens. Returns the image features output."""
    policy = pruned.config.position_policy
    with torch.no_grad():
        image_output = image_features(pruned, inputs)
        reference_inputs = oracle_inputs(inputs, image_output, pruned.config.image_token_id, policy)
        greedy = {
            "max_new_tokens": NEW_TOKENS,
            "do_sample": False,
            "output_logits": True,
            "return_dict_in_generate": True,
        }
        ours = pruned.generate(**inputs, **greedy)
        reference = stock.generate(**reference_inputs, **greedy)

        assert torch.equal(ours.sequences, reference.sequences)
        assert torch.equal(ours.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        assert max_abs_diff(ours.logits, reference.logits) <= TOLERANCE

        forward = pruned(**inputs)
        reference_forward = stock(**reference_inputs)
    kept = forward.source_index >= 0
    index = forward.source_index.clamp_min(0).unsqueeze(-1).expand(-1, -1, forward.logits.shape[-1])
    reference_logits = torch.gather(reference_forward.logits, 1, index)
    assert float((forward.logits - reference_logits)[kept].abs().max()) <= TOLERANCE
    assert int(kept.sum()) == int(reference_inputs["attention_mask"].sum())
    return image_output


def assert_turns_match_oracle(
    pruned, stock, inputs: dict, turn: list[int], cache_name: str, turns: int = 3, **generation
) -> None:
    """Multi-turn chat: after the first answer, each turn passes the whole conversation so far plus the `turn` ids
    (every row), its mask and the previous turn's cache under `cache_name`; every turn's tokens and logits equal
    the masked stock model continuing its own cache (for an in-LLM selector, with the prompt's dropped tokens
    hidden from its layer K on), and the returned sequences start with the caller's ids. `generation`: further
    `generate()` options for both models."""
    policy = pruned.config.position_policy
    greedy = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    greedy.update(generation)
    prompt_length = inputs["input_ids"].shape[1]
    hiding = layer_hiding(pruned, stock, inputs)
    with torch.no_grad():
        image_output = image_features(pruned, inputs)
        ours = pruned.generate(**inputs, **greedy)
        with hiding:
            reference = stock.generate(
                **oracle_inputs(inputs, image_output, pruned.config.image_token_id, policy), **greedy
            )
        for _ in range(turns):
            assert torch.equal(ours.sequences, reference.sequences)
            assert max_abs_diff(ours.logits, reference.logits) <= TOLERANCE
            new_ids = torch.tensor([turn] * len(ours.sequences))
            sequence = torch.cat([ours.sequences, new_ids], dim=1)
            mask = torch.ones_like(sequence)
            mask[:, :prompt_length] = inputs["attention_mask"]
            conversation = {"input_ids": sequence, "attention_mask": mask}
            reference_turn = oracle_inputs(conversation, image_output, pruned.config.image_token_id, policy)
            ours = pruned.generate(**conversation, **{cache_name: output_cache(ours)}, **greedy)
            with hiding:
                reference = stock.generate(**reference_turn, **cache_argument(output_cache(reference)), **greedy)
            assert torch.equal(ours.sequences[:, : sequence.shape[1]], sequence)
        assert torch.equal(ours.sequences, reference.sequences)
        assert max_abs_diff(ours.logits, reference.logits) <= TOLERANCE


class HidingByLayer:
    """The oracle of in-LLM pruning, as a reusable context: the stock model with prompt positions hidden from every
    query of the decoder layers from each cut on: `hidden` maps a cut layer to the (B, P) positions hidden from it
    and every deeper layer up to the next cut (their key columns masked; layers below the first cut see them all).
    Rows of expanded batches (beams, return sequences) take their prompt's row."""

    def __init__(self, stock, hidden: dict[int, torch.Tensor]) -> None:
        self.stock_layers = stock.model.language_model.layers
        self.hidden = hidden
        self.handles: list = []

    def hide(self, hidden: torch.Tensor, module, args, kwargs):
        states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch, queries = states.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:  # SDPA's implicit causal mask
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            keys = queries + (cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0)
            mask = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries).expand(batch, 1, -1, -1)
        assert mask.dtype == torch.bool, "the oracle needs the SDPA (boolean) mask"
        columns = torch.zeros(batch, mask.shape[-1], dtype=torch.bool)
        columns[:, : hidden.shape[1]] = hidden.repeat_interleave(batch // len(hidden), dim=0)
        return args, {**kwargs, "attention_mask": mask & ~columns[:, None, None, :]}

    def __enter__(self) -> Self:
        cuts = sorted(self.hidden)
        for index in range(cuts[0], len(self.stock_layers)):
            hidden = self.hidden[max(cut for cut in cuts if cut <= index)]
            hook = partial(self.hide, hidden)
            self.handles.append(self.stock_layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def cut_layers_of(forward) -> list[int]:
    """The in-LLM cut layers a pruned forward reports, ascending."""
    return sorted(layer for layer in forward.kept_indices_by_layer if layer > 0)


def layer_hiding(pruned, stock, inputs: dict, forward=None) -> AbstractContextManager:
    """The oracle's hiding of the tokens `pruned`'s in-LLM selector drops at each of its cuts (`HidingByLayer` with
    the tokens its forward on `inputs` reports); nothing for a vision-stage selector."""
    config = pruned.config
    if config.pruning.token_selector.stage != "language":
        return nullcontext()
    with torch.no_grad():
        forward = pruned(**inputs) if forward is None else forward
        vision_stage = image_features(pruned, inputs)
    hidden = {
        layer: dropped_placeholders(
            inputs["input_ids"],
            config.image_token_id,
            forward.kept_indices_by_layer[layer],
            vision_stage.tokens_per_image,
        )
        for layer in cut_layers_of(forward)
    }
    return HidingByLayer(stock, hidden)


def assert_matches_layer_oracle(pruned, stock, inputs: dict, **generation) -> None:
    """In-LLM pruning equals the stock model fed the full sequence with the tokens the vision stage dropped masked
    in every layer and those the in-LLM selector dropped at each cut hidden from that layer on: logits at every
    kept position of a forward, and `generate(**generation)` (greedy, 6 new tokens by default) tokens and logits.
    After the prefill, each layer's cache holds the tokens present when it ran: the vision stage's below the
    first cut, each cut's from there on."""
    with torch.no_grad():
        forward = pruned(**inputs)
        vision_stage = image_features(pruned, inputs)
        reference_inputs = oracle_inputs(
            inputs, vision_stage, pruned.config.image_token_id, pruned.config.position_policy
        )
        hiding = layer_hiding(pruned, stock, inputs, forward)
        with hiding:
            reference_forward = stock(**reference_inputs)
        kept = forward.source_index >= 0
        index = forward.source_index.clamp_min(0).unsqueeze(-1).expand(-1, -1, forward.logits.shape[-1])
        reference_logits = torch.gather(reference_forward.logits, 1, index)
        assert float((forward.logits - reference_logits)[kept].abs().max()) <= TOLERANCE

        cuts = cut_layers_of(forward)
        assert cuts, "an in-LLM selector cuts at least once"
        lengths_by_cut = {0: int(reference_inputs["attention_mask"].sum(-1).max())}
        for layer in cuts:
            mask = inputs["attention_mask"].bool() & ~hiding.hidden[layer]
            lengths_by_cut[layer] = int(mask.sum(-1).max())
            kept_tokens = sum(len(kept) for kept in forward.kept_indices_by_layer[layer])
            n_text = int(inputs["attention_mask"].sum()) - sum(vision_stage.tokens_per_image)
            assert int(mask.sum()) == n_text + kept_tokens
        assert int(kept.sum()) == int(mask.sum())
        cache = output_cache(forward)
        n_layers = pruned.config.text_config.num_hidden_layers
        lengths = [cache.get_seq_length(index) for index in range(n_layers)]
        expected = [lengths_by_cut[max(cut for cut in [0, *cuts] if cut <= index)] for index in range(n_layers)]
        assert lengths == expected

        options = {
            "max_new_tokens": NEW_TOKENS,
            "do_sample": False,
            "output_logits": True,
            "return_dict_in_generate": True,
        }
        options.update(generation)
        seed = options.pop("seed", 0)
        torch.manual_seed(seed)
        ours = pruned.generate(**inputs, **options)
        torch.manual_seed(seed)
        with hiding:
            reference = stock.generate(**reference_inputs, **options)
    assert torch.equal(ours.sequences, reference.sequences)
    if "logits" in reference:
        assert max_abs_diff(ours.logits, reference.logits) <= TOLERANCE
