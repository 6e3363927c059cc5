"""Trains the built-in small LLaVA on the synthetic visual-question task, from a seed, on CPU.

    python -m adaprune.tools.train_builtin [--steps 4500] [--vision-steps 600] [--seed 0] [--output-dir DIR]

From random weights, in two stages as LLaVA (which starts from a pre-trained CLIP):

1. **Vision pre-training** (`--vision-steps`): the tower alone, with linear heads on its feature layer standing in
   for CLIP's pre-training: the [CLS] predicts which (colour, shape) pairs, tile colours and digits the scene
   contains (CLIP's contrastive training is what makes a real [CLS] attend to what an image shows, the pruning
   cue of the `cls_attention` selector), and each patch predicts what it shows and its column.
2. **Visual instruction tuning** (`--steps`): the projector and the language model, the tower frozen (as LLaVA's),
   on the answer tokens' cross-entropy plus aids that stand in for a real LLaVA's scale of data and training:
   - an alignment loss (as LLaVA's first stage aligns visual tokens with words: the language model's output at
     each kept object's position names that object, its colour and its shape or digit);
   - a retrieval hint: at each question word that names objects, head 0 of decoder layers 1 and 2 is asked to
     attend to the objects it names (a count spreads evenly over them and the BOS token, a sink; an absent object
     points at the BOS token alone);
   - noun probes: a linear head reads the named object's column, or the count, from that word's state after
     layer 2;
   - a reading hint: at the position that predicts the answer, heads 0 and 1 of decoder layer 3 attend to the
     first and the last word that names objects (two heads, so a left/right question's two columns stay apart).
   Without them a model this small, trained for half an hour, does not get past about 50%. Training runs with
   eager attention (the hints need the weights); the saved model uses SDPA. Batches are drawn by one background
   worker.

Token dropping in stage 2: most steps show the language model only k of the 144 visual tokens, in their original
order: the objects the question is about first, then other objects, then background cells at random (one k per
step, log-uniform between 6 and a maximum that grows from 6 to 144 over the first half of training; after that a
quarter of the steps keep all 144). The short sequences early on (the asked object among few others) teach it
quickly where to look, and a pruned model's shorter sequence is not new to it. The heads and probes are discarded.

Stage 2's samples come from `synthetic_vqa.sample('train', i)` in order (every count question and the others at even
`i`, so that counts get more practice), so a run is a function of its arguments (on one
machine and torch version, two CPU threads). It writes a stock llava-hf checkpoint with its processor and
`training.json` (arguments, time, losses and accuracy on 256 calibration questions along the way).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration

from . import synthetic_vqa
from .builtin_llava import BUILTIN_DIRECTORY, BUILTIN_GEOMETRY, build_builtin_processor
from .evaluation import Variant, run_variant, summarize
from .tiny_llava import build_config

PAIRS = [(colour, shape) for colour in synthetic_vqa.COLOURS for shape in synthetic_vqa.SHAPES]
SUMMARY_SIZE = len(PAIRS) + len(synthetic_vqa.COLOURS) + len(synthetic_vqa.DIGITS)
TILES = [(colour, digit) for colour in synthetic_vqa.COLOURS for digit in synthetic_vqa.DIGITS]
PATCH_CLASSES = 1 + len(PAIRS) + len(TILES)  # background, a shape, a tile
FULL_SHARE = 0.25  # share of steps with all visual tokens; the others keep k of them, k log-uniform
MIN_KEPT = 6  # at least every object a question is about (counts go up to 5)
VISION_START = 10**7  # first training-split index of the vision pre-training stage
RETRIEVAL_LAYERS = (1, 2)  # decoder layers whose head 0 gets the retrieval hint at the question's object words
PROBE_LAYER = 3  # hidden state (after decoder layer 2) on which the noun probes read a named object's column or count
READING_LAYER = 3  # decoder layer whose heads 0 and 1 are hinted to read, from the answering position, the first
# and the last word that names objects
NOUNS = {*synthetic_vqa.SHAPES, *synthetic_vqa.PLURALS.values(), "object", "tile"}  # words that name objects
MAX_NOUNS = 2  # a position question names two objects
SINK_WEIGHT = 2  # in a count's retrieval target the BOS token weighs as much as this many counted objects


def scene_summary(sample: synthetic_vqa.Sample) -> torch.Tensor:
    """Multi-hot of what the scene contains: (colour, shape) pairs, tile colours, digits."""
    target = torch.zeros(SUMMARY_SIZE)
    colours, digits = list(synthetic_vqa.COLOURS), list(synthetic_vqa.DIGITS)
    for obj in sample.objects:
        if obj.kind == "shape":
            target[PAIRS.index((obj.colour, obj.label))] = 1
        else:
            target[len(PAIRS) + colours.index(obj.colour)] = 1
            target[len(PAIRS) + len(colours) + digits.index(obj.label)] = 1
    return target


def patch_contents(sample: synthetic_vqa.Sample) -> torch.Tensor:
    """(144,) class of each patch: 0 background, then the (colour, shape) pairs, then the (colour, digit) tiles."""
    classes = torch.zeros(synthetic_vqa.GRID**2, dtype=torch.long)
    for obj in sample.objects:
        if obj.kind == "shape":
            classes[obj.row * synthetic_vqa.GRID + obj.col] = 1 + PAIRS.index((obj.colour, obj.label))
        else:
            classes[obj.row * synthetic_vqa.GRID + obj.col] = 1 + len(PAIRS) + TILES.index((obj.colour, obj.label))
    return classes


def patch_words(sample: synthetic_vqa.Sample, tokenizer) -> torch.Tensor:
    """(144, 2) token ids of the words naming each patch's object (colour, then shape or digit); -100 for
    background."""
    words = torch.full((synthetic_vqa.GRID**2, 2), -100, dtype=torch.long)
    for obj in sample.objects:
        words[obj.row * synthetic_vqa.GRID + obj.col] = torch.tensor(
            tokenizer.convert_tokens_to_ids([obj.colour, obj.label])
        )
    return words


def kept_cells(sample: synthetic_vqa.Sample, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` cells in ascending order: the asked-about objects, other objects, then random background."""
    asked = list(sample.cells)
    others = [obj.row * synthetic_vqa.GRID + obj.col for obj in sample.objects]
    others = [cell for cell in others if cell not in asked]
    background = [cell for cell in range(synthetic_vqa.GRID**2) if cell not in asked and cell not in others]
    order = asked + list(rng.permutation(others)) + list(rng.permutation(background))
    return np.sort(np.asarray(order[:count], dtype=np.int64))


def noun_targets(
    sample: synthetic_vqa.Sample, tokens: list[str], cells: np.ndarray
) -> tuple[list[int], list[list[int]], list[int]]:
    """For each word of the prompt `tokens` that names objects: its position; the positions it points at, each
    listed once per unit of weight (the named objects' image tokens among the kept `cells`; for a count also the BOS
    token, a sink, SINK_WEIGHT times; the BOS token alone for an absent object); and what the noun probe reads there
    (the named object's column, or the grid width plus the count)."""
    nouns = [at for at, token in enumerate(tokens) if token in NOUNS]
    image_at = tokens.index("<image>")
    index = {int(cell): image_at + slot for slot, cell in enumerate(cells)}
    named = [[index[cell]] for cell in sample.cells] if len(nouns) == 2 else [[index[cell] for cell in sample.cells]]
    if sample.question_type == "count":
        return nouns, [[0] * SINK_WEIGHT + named[0]], [synthetic_vqa.GRID + len(sample.cells)]
    if not named[0]:  # a presence question about an absent object
        return nouns, [[0]], [-100]
    return nouns, named, [sample.cells[slot] % synthetic_vqa.GRID for slot in range(len(nouns))]


def stage_two_indices() -> Iterator[int]:
    """Training-split indices for stage 2, in order: every count question and every other question at an even index
    (counting, the hardest skill, gets 2/7 of the questions instead of 1/6)."""
    for index in itertools.count():
        if index % 2 == 0 or synthetic_vqa.sample("train", index).question_type == "count":
            yield index


class Batches:
    """Training batches: pixel values, token ids with `k` image tokens, labels on the answer and EOS, and the
    targets of the training aids."""

    def __init__(self, processor, batch_size: int, steps: int, seed: int) -> None:
        self.processor = processor
        self.steps = steps
        self.tokenizer = processor.tokenizer
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        image_processor = processor.image_processor
        self.mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
        self.image_token_id = processor.image_token_id
        self.index_stream, self.indices = stage_two_indices(), []

    def pixel_values(self, items: list[synthetic_vqa.Sample]) -> torch.Tensor:
        """As the processor makes them (192 px images need no resize or crop): rescale and normalise."""
        pixels = torch.from_numpy(np.stack([item.pixels() for item in items])).permute(0, 3, 1, 2).float() / 255
        return (pixels - self.mean) / self.std

    def token_batch(self, items: list[synthetic_vqa.Sample], image_tokens: int) -> dict[str, torch.Tensor]:
        sequences, label_rows = [], []
        for item in items:
            prompt = self.tokenizer(item.prompt)["input_ids"]
            at = prompt.index(self.image_token_id)
            prompt = prompt[:at] + [self.image_token_id] * image_tokens + prompt[at + 1 :]
            answer = self.tokenizer(item.answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            sequences.append(prompt + answer)
            label_rows.append([-100] * len(prompt) + answer)
        length = max(map(len, sequences))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([row + [pad] * (length - len(row)) for row in sequences])
        labels = torch.tensor([row + [-100] * (length - len(row)) for row in label_rows])
        attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in sequences])
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def noun_batch(
        self, items: list[synthetic_vqa.Sample], cells: torch.Tensor, token_batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The retrieval hint's rows and target distributions, and the noun probes' targets (see `noun_targets`), for
        the prompts of `token_batch` (the tokens before the first labelled one)."""
        input_ids, labels = token_batch["input_ids"], token_batch["labels"]
        rows = torch.zeros(len(items), MAX_NOUNS, dtype=torch.long)
        targets = torch.zeros(len(items), MAX_NOUNS, input_ids.shape[1])
        probes = torch.full((len(items), MAX_NOUNS), -100, dtype=torch.long)
        valid = torch.zeros(len(items), MAX_NOUNS, dtype=torch.bool)
        prompt_lengths = (labels != -100).int().argmax(dim=1).tolist()
        for row, (item, kept, length) in enumerate(zip(items, cells.numpy(), prompt_lengths)):
            tokens = self.tokenizer.convert_ids_to_tokens(input_ids[row, :length].tolist())
            nouns, named, probe = noun_targets(item, tokens, kept)
            for slot, (noun, positions, reading) in enumerate(zip(nouns, named, probe)):
                rows[row, slot], probes[row, slot], valid[row, slot] = noun, reading, True
                targets[row, slot].index_add_(
                    0, torch.tensor(positions), torch.full((len(positions),), 1 / len(positions))
                )
        return {
            "noun_rows": rows,
            "noun_targets": targets,
            "noun_probes": probes,
            "noun_valid": valid,
            "last_noun": rows.gather(1, valid.sum(1, keepdim=True) - 1).squeeze(1),
        }

    def vision_batch(self, step: int) -> dict[str, torch.Tensor]:
        """Scenes for the vision pre-training stage (the training split from its far end, not shared with stage 2)."""
        items = list(synthetic_vqa.samples("train", self.batch_size, start=VISION_START + step * self.batch_size))
        return {
            "pixel_values": self.pixel_values(items),
            "summary": torch.stack([scene_summary(item) for item in items]),
            "contents": torch.stack([patch_contents(item) for item in items]),
        }

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        while len(self.indices) < (step + 1) * self.batch_size:
            self.indices.append(next(self.index_stream))
        items = [
            synthetic_vqa.sample("train", index) for index in self.indices[step * self.batch_size :][: self.batch_size]
        ]
        tokens = synthetic_vqa.GRID**2
        # curriculum: the most tokens a step keeps grows from MIN_KEPT to all over the first half of training
        most = round(MIN_KEPT + (tokens - MIN_KEPT) * min(1.0, 2 * step / self.steps))
        if most == tokens and self.rng.random() < FULL_SHARE:
            count = tokens
        else:
            count = int(np.exp(self.rng.uniform(np.log(MIN_KEPT), np.log(most))).round())
        cells = torch.from_numpy(np.stack([kept_cells(item, count, self.rng) for item in items]))
        tokens = self.token_batch(items, count)
        return {
            **tokens,
            **self.noun_batch(items, cells, tokens),
            "pixel_values": self.pixel_values(items),
            "cells": cells,
            "summary": torch.stack([scene_summary(item) for item in items]),
            "contents": torch.stack([patch_contents(item) for item in items]),
            "words": torch.stack([patch_words(item, self.tokenizer) for item in items]),
        }


class PretrainingHeads(nn.Module):
    """Linear heads on the vision tower's feature layer that stand in for CLIP's pre-training (discarded after
    training): the [CLS] predicts what the scene contains, each patch what it shows and which column it is in."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.summary = nn.Linear(width, SUMMARY_SIZE)
        self.contents = nn.Linear(width, PATCH_CLASSES)
        self.column = nn.Linear(width, synthetic_vqa.GRID)

    def loss(self, states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        patches = states[:, 1:]
        columns = torch.arange(patches.shape[1]).remainder(synthetic_vqa.GRID).expand(len(patches), -1)
        return (
            F.binary_cross_entropy_with_logits(self.summary(states[:, 0]), batch["summary"])
            + F.cross_entropy(self.contents(patches).flatten(0, 1), batch["contents"].flatten())
            + F.cross_entropy(self.column(patches).flatten(0, 1), columns.flatten())
        )


def losses(
    model: LlavaForConditionalGeneration, noun_probe: nn.Linear, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer cross-entropy, the aids' loss: alignment, retrieval and reading hints, noun probes) for one batch,
    through the stock modules; the tower is frozen."""
    config = model.config
    with torch.no_grad():
        tower = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
    states = tower.hidden_states[config.vision_feature_layer]
    features = model.model.multi_modal_projector(states[:, 1:])
    kept = features.gather(1, batch["cells"][..., None].expand(-1, -1, features.shape[-1]))
    embeds = model.get_input_embeddings()(batch["input_ids"])
    image_positions = (batch["input_ids"] == config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(image_positions, kept.to(embeds.dtype))
    output = model.model.language_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_attentions=True, output_hidden_states=True
    )
    hidden = output.last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    answer_loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten())
    is_image = batch["input_ids"] == config.image_token_id
    # alignment, as LLaVA's first stage: the output at each kept object's position names the object (colour, label)
    words = batch["words"].gather(1, batch["cells"][..., None].expand(-1, -1, 2))
    image_logits = model.lm_head(hidden)[is_image].view(*words.shape[:2], -1)
    alignment_loss = (
        sum(
            F.cross_entropy(image_logits.flatten(0, 1), words[..., slot].flatten(), ignore_index=-100)
            for slot in (0, 1)
        )
        / 2
    )
    # retrieval hint: at each question word that names objects, head 0 of each RETRIEVAL_LAYERS attends to them
    rows, valid = batch["noun_rows"], batch["noun_valid"]
    batch_index = torch.arange(len(rows))
    hint_loss = torch.zeros(())
    for layer in RETRIEVAL_LAYERS:
        weights = output.attentions[layer][batch_index[:, None], 0, rows]  # (batch, nouns, sequence), head 0
        cross_entropy = -(batch["noun_targets"] * torch.log(weights + 1e-6)).sum(-1)
        hint_loss = hint_loss + cross_entropy[valid].mean() / len(RETRIEVAL_LAYERS)
    # reading hint: from the answering position, head 0 reads the first word that names objects, head 1 the last
    answering = (batch["labels"] != -100).int().argmax(dim=1) - 1
    reading = output.attentions[READING_LAYER][batch_index, :, answering]  # (batch, heads, sequence)
    read_first = reading[batch_index, 0, rows[:, 0]]
    read_last = reading[batch_index, 1, batch["last_noun"]]
    hint_loss = hint_loss - (torch.log(read_first + 1e-6) + torch.log(read_last + 1e-6)).mean() / 2
    # noun probes: the state at such a word after the retrieval layers tells the named object's column, or the count
    noun_states = output.hidden_states[PROBE_LAYER][batch_index[:, None], rows]
    probe_loss = F.cross_entropy(
        noun_probe(noun_states).flatten(0, 1), batch["noun_probes"].flatten(), ignore_index=-100
    )
    return answer_loss, alignment_loss + hint_loss + probe_loss


def accuracy(model: LlavaForConditionalGeneration, processor, split: str, count: int) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on the first `count` samples of `split` (all visual tokens), overall
    and per question type, as `adaprune eval` scores them."""
    questions = list(synthetic_vqa.samples(split, count))
    summary = summarize(run_variant(model, processor, Variant("all tokens", {}), questions, batch_size=64), questions)
    by_type = {kind: round(entry["accuracy"], 3) for kind, entry in summary["by_type"].items()}
    return {"all": round(summary["accuracy"], 4), **by_type}


class BatchStream(torch.utils.data.IterableDataset):
    """The stage-2 batches in step order, drawn in one background worker while the main process trains."""

    def __init__(self, batches: Batches, steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __iter__(self):
        return (self.batches(step) for step in range(self.steps))


def _one_thread(worker: int) -> None:
    torch.set_num_threads(1)


def pretrain_vision(
    model: LlavaForConditionalGeneration, heads: PretrainingHeads, batches: Batches, steps: int, learning_rate: float
) -> float:
    """Stage 1: the vision tower and its pre-training heads alone (LLaVA starts from a pre-trained CLIP); returns
    the last loss."""
    tower = model.model.vision_tower
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=learning_rate, weight_decay=0.01)
    for step in range(steps):
        batch = batches.vision_batch(step)
        states = tower(batch["pixel_values"], output_hidden_states=True).hidden_states[
            model.config.vision_feature_layer
        ]
        loss = heads.loss(states, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def train(
    steps: int, vision_steps: int, batch_size: int, seed: int, learning_rate: float, output_dir: Path, eval_every: int
) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    processor = build_builtin_processor()
    config = build_config(processor, BUILTIN_GEOMETRY)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    heads = PretrainingHeads(BUILTIN_GEOMETRY.vision_hidden)
    batches = Batches(processor, batch_size, steps, seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    log, started = [], time.perf_counter()
    vision_loss = pretrain_vision(model, heads, batches, vision_steps, learning_rate)
    vision_record = {
        "steps": vision_steps,
        "seconds": round(time.perf_counter() - started, 1),
        "loss": round(vision_loss, 4),
    }
    print(json.dumps({"vision": vision_record}), flush=True)
    model.model.vision_tower.requires_grad_(False)
    model.model.language_model.set_attn_implementation("eager")  # the retrieval hint needs attention weights
    noun_probe = nn.Linear(BUILTIN_GEOMETRY.text_hidden, synthetic_vqa.GRID + synthetic_vqa.MAX_COUNT + 1)
    parameters = [parameter for parameter in [*model.parameters(), *noun_probe.parameters()] if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    stream = torch.utils.data.DataLoader(
        BatchStream(batches, steps), batch_size=None, num_workers=1, prefetch_factor=8, worker_init_fn=_one_thread
    )
    for step, batch in enumerate(stream):
        model.train()
        answer_loss, alignment_loss = losses(model, noun_probe, batch)
        optimizer.zero_grad(set_to_none=True)
        (answer_loss + alignment_loss).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            entry = {
                "step": step + 1,
                "seconds": round(time.perf_counter() - started, 1),
                "answer_loss": round(answer_loss.item(), 4),
                "alignment_loss": round(alignment_loss.item(), 4),
                "calibration_accuracy": accuracy(model, processor, "calibration", 256),
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
            model.save_pretrained(output_dir)
    model.eval()
    model.model.language_model.set_attn_implementation("sdpa")
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    record = {
        "command": f"python -m adaprune.tools.train_builtin --steps {steps} --vision-steps {vision_steps} "
        f"--batch-size {batch_size} --seed {seed} --learning-rate {learning_rate}",
        "seed": seed,
        "steps": steps,
        "vision_steps": vision_steps,
        "vision": vision_record,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "log": log,
    }
    (output_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--vision-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--output-dir", type=Path, default=BUILTIN_DIRECTORY)
    args = parser.parse_args(argv)
    train(
        args.steps, args.vision_steps, args.batch_size, args.seed, args.learning_rate, args.output_dir, args.eval_every
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
