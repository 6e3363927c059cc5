"""The contract every registered pruning method meets, on either model family.

`check_contract(family, settings)` loads the pruning model with `settings` (which choose the method) and checks
the oracle (greedy tokens and logits of `generate()` and `forward()` equal the stock model fed the full sequence
with the dropped image tokens masked out; for an in-LLM selector, masked from its layer K on), batch invariance (each row alone gives the batch's tokens and
budgets), and the other decoding modes (beams with several returned sequences, sampling, no cache) against the
oracle. The remote-code round trip of every method is `check_remote_round_trip`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from support.oracle import (
    assert_matches_layer_oracle,
    assert_matches_oracle,
    image_features,
    layer_hiding,
    load_pruned,
    max_abs_diff,
    oracle_inputs,
)
from support.remote_code import run_isolated

PROMPTS = (
    "USER: <image> describe this picture ASSISTANT:",
    "USER: <image> and <image> compare the two ASSISTANT:",
    "USER: a dog ASSISTANT:",
)
IMAGES_PER_PROMPT = (1, 2, 0)
DECODING_MODES = (
    {"num_beams": 2, "num_return_sequences": 2, "do_sample": False},
    {"do_sample": True, "top_k": 5, "num_return_sequences": 2},
    {"do_sample": False, "use_cache": False},
)
NEW_TOKENS = 4


@dataclass
class Family:
    """A model family's tiny stock checkpoint, its stock model and processor, and three images of its kind.

    settings: values that keep every method's budgets sensible on the tiny images (e.g. a small min_tokens).
    """

    name: str
    checkpoint: Path
    stock: PreTrainedModel
    processor: ProcessorMixin
    images: list[Image.Image]
    settings: dict[str, Any]

    def inputs(self, rows: list[int]) -> dict:
        """Processor inputs for the chosen PROMPTS (left padded), images handed out in prompt order."""
        starts = [sum(IMAGES_PER_PROMPT[:row]) for row in range(len(PROMPTS))]
        images = [self.images[starts[row] + index] for row in rows for index in range(IMAGES_PER_PROMPT[row])]
        prompts = [PROMPTS[row] for row in rows]
        return dict(self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt"))


def check_contract(family: Family, settings: dict[str, Any]) -> None:
    """The oracle, batch invariance and decoding modes for the pruning model with `settings`."""
    pruned = load_pruned(family.checkpoint, **{**family.settings, **settings})
    rows = [1, 2, 0]
    batch = family.inputs(rows)
    if pruned.config.pruning.token_selector.stage == "language":
        assert_matches_layer_oracle(pruned, family.stock, batch)
        image_output = image_features(pruned, batch)
    else:
        image_output = assert_matches_oracle(pruned, family.stock, batch)

    greedy = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        together = pruned.generate(**batch, **greedy)
        alone_budgets = []
        for position, row in enumerate(rows):
            single = family.inputs([row])
            alone = pruned.generate(**single, **greedy)
            length = single["input_ids"].shape[1]
            assert torch.equal(alone.sequences[0, length:], together.sequences[position, batch["input_ids"].shape[1] :])
            assert (
                max_abs_diff([step[0] for step in alone.logits], [step[position] for step in together.logits]) <= 1e-4
            )
            if "pixel_values" in single:
                alone_budgets += image_features(pruned, single).token_budgets.tolist()
    assert image_output.token_budgets.tolist() == alone_budgets

    reference_inputs = oracle_inputs(batch, image_output, pruned.config.image_token_id, pruned.config.position_policy)
    hiding = layer_hiding(pruned, family.stock, batch)
    with torch.no_grad():
        for mode in DECODING_MODES:
            torch.manual_seed(7)
            ours = pruned.generate(**batch, max_new_tokens=NEW_TOKENS, **mode)
            torch.manual_seed(7)
            with hiding:
                reference = family.stock.generate(**reference_inputs, max_new_tokens=NEW_TOKENS, **mode)
            assert torch.equal(ours, reference), mode


ROUND_TRIP_BODY = """
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained(PARAMS["checkpoint"], trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(PARAMS["checkpoint"], trust_remote_code=True)
inputs = torch.load(PARAMS["inputs"])
results = []
for settings in PARAMS["settings"]:
    for name, value in settings.items():
        setattr(model.config, name, value)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes"))
        tokens = model.generate(**inputs, max_new_tokens=PARAMS["new_tokens"], do_sample=False)
    results.append({"kept": [kept.tolist() for kept in features.kept_indices], "tokens": tokens.tolist()})
emit({"class": type(model).__name__, "results": results})
"""


def check_remote_round_trip(family: Family, all_settings: list[dict[str, Any]], workdir: Path) -> None:
    """Saved with `save_pretrained`, the checkpoint loads from its own code in a process that cannot import
    adaprune, and every settings in `all_settings` keeps the same tokens and generates the same as the package."""
    pruned = load_pruned(family.checkpoint, **family.settings)
    checkpoint = workdir / "checkpoint"
    pruned.save_pretrained(checkpoint)
    family.processor.save_pretrained(checkpoint)
    batch = family.inputs([1, 2, 0])
    torch.save(batch, workdir / "inputs.pt")
    expected = []
    for settings in all_settings:
        model = load_pruned(checkpoint, **settings)
        with torch.no_grad():
            features = image_features(model, batch)
            tokens = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected.append({"kept": [kept.tolist() for kept in features.kept_indices], "tokens": tokens.tolist()})
    params = {
        "checkpoint": str(checkpoint),
        "inputs": str(workdir / "inputs.pt"),
        "settings": all_settings,
        "new_tokens": NEW_TOKENS,
    }
    remote = run_isolated(ROUND_TRIP_BODY, workdir / "remote", params).result
    assert remote["class"] == type(pruned).__name__
    assert remote["results"] == expected
