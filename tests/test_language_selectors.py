"""The in-LLM selectors' choices: FastV's equals the top-k of the last row of layer K-1's attention in an
eager-attention stock run; AdaptPrune's soft suppression equals a plain loop written here from the paper's
description (and the released constants)."""

from __future__ import annotations

import math

import pytest
import torch
from support.oracle import load_pruned
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from adaprune.method_adaptprune import AdaptPruneSelector, centred_prior, soft_suppression_keep
from adaprune.token_selection import PatchGrid


def loop_suppression(scores, keys, side, budget, radius=5.0, distance_sigma=1.5, similarity_sigma=0.05):
    """One image, token by token: keep the best remaining score, decay its window's scores, repeat."""
    scores = [float(value) for value in scores]
    kept = []
    for _ in range(budget):
        best = max((index for index in range(len(scores)) if index not in kept), key=lambda index: scores[index])
        kept.append(best)
        row, col = divmod(best, side)
        for other in range(len(scores)):
            other_row, other_col = divmod(other, side)
            distance = math.hypot(row - other_row, col - other_col)
            if distance <= radius and other not in kept:
                cosine = float(torch.nn.functional.cosine_similarity(keys[best], keys[other], dim=0))
                decay = math.exp(-(distance**2) / (2 * distance_sigma**2))
                decay *= math.exp(-((1 - cosine) ** 2) / (2 * similarity_sigma**2))
                scores[other] *= 1 - decay
    return sorted(kept)


def grid_of(side: int) -> torch.Tensor:
    index = torch.arange(side * side)
    return torch.stack([index // side, index % side], dim=-1)


@pytest.mark.parametrize("seed", range(6))
def test_soft_suppression_equals_the_loop_reference(seed: int) -> None:
    """Several images at once, each with its own budget; keys with near-duplicates so the decay matters."""
    generator = torch.Generator().manual_seed(seed)
    side, n_images = 7, 3
    scores = torch.rand(n_images, side * side, generator=generator, dtype=torch.float64)
    base = torch.randn(n_images, 4, 8, generator=generator, dtype=torch.float64)
    choice = torch.randint(0, 4, (n_images, side * side), generator=generator)
    keys = base.gather(1, choice[..., None].expand(-1, -1, 8))
    keys = keys + 0.03 * torch.randn(keys.shape, generator=generator, dtype=torch.float64)
    budgets = torch.randint(1, 20, (n_images,), generator=generator)

    keep = soft_suppression_keep(scores, keys, PatchGrid.square(side, n_images), budgets, 5.0, 1.5, 0.05)
    for image in range(n_images):
        expected = loop_suppression(scores[image], keys[image], side, int(budgets[image]))
        assert keep[image].nonzero().flatten().tolist() == expected


def test_suppression_spreads_choices_over_similar_neighbours() -> None:
    """Equal keys everywhere: the neighbours of a kept token are suppressed, so the picks spread out, unlike
    top-k, which takes the whole bright blob."""
    side = 9
    grid = grid_of(side)
    scores = torch.exp(-((grid - 4).float() ** 2).sum(-1) / 8).unsqueeze(0)
    keys = torch.ones(1, side * side, 4)
    keep = soft_suppression_keep(scores, keys, PatchGrid.square(side, 1), torch.tensor([5]), 5.0, 1.5, 0.05)
    picked = grid[keep[0]].float()
    assert torch.cdist(picked, picked).add(torch.eye(5) * 99).min() >= 2
    top = scores[0].topk(5).indices
    assert not torch.equal(keep[0].nonzero().flatten().sort().values, top.sort().values)


def test_the_prior_is_the_released_gaussian_on_24_by_24() -> None:
    """sigma 0.5 of the side is the released exp(-(x² + y²) / (2 * 12²)) on linspace(-12, 12, 24), peak 1."""
    prior = centred_prior(PatchGrid.square(24, 1), 0.5).view(24, 24)
    axis = torch.linspace(-12, 12, 24)
    released = torch.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * 12.0**2))
    torch.testing.assert_close(prior, released / released.max())


def two_crops(side: int) -> PatchGrid:
    """One unit of two side x side crops (views 0 and 1), as a LLaVA-NeXT image's base crop and one grid crop."""
    square = PatchGrid.square(side, 1)
    return PatchGrid(
        cell=square.cell.repeat(1, 2, 1),
        view=torch.arange(2).repeat_interleave(side * side).unsqueeze(0),
        side=side,
    )


def test_each_crop_has_its_own_centred_prior() -> None:
    grid = two_crops(5)
    prior = centred_prior(grid, 0.5).view(2, 25)
    torch.testing.assert_close(prior[0], prior[1])
    assert int(prior[0].argmax()) == 12 and float(prior.max()) == 1.0


def test_suppression_stays_within_a_crop() -> None:
    """Equal keys, and the same bright spot in both crops: the picks alternate between the crops (a pick suppresses
    its neighbours in its own crop only), so the same cell is kept in each."""
    side = 7
    grid = two_crops(side)
    spot = torch.exp(-((grid_of(side) - 3).float() ** 2).sum(-1) / 8)
    scores = torch.cat([spot, spot * 0.99]).unsqueeze(0)
    keep = soft_suppression_keep(scores, torch.ones(1, 2 * side * side, 4), grid, torch.tensor([2]), 5.0, 1.5, 0.05)
    assert keep[0].nonzero().flatten().tolist() == [24, 49 + 24]


def test_absent_tokens_are_never_kept() -> None:
    """Tokens a vision stage dropped (score -inf) are never picked, even with a budget of every present one."""
    side = 5
    scores = torch.rand(2, side * side)
    scores[:, ::2] = float("-inf")
    present = torch.isfinite(scores)
    budgets = present.sum(-1)
    selector = AdaptPruneSelector()
    keep = selector.keep_mask(
        {"prompt_attention": scores, "keys": torch.randn(2, 25, 4), "grid": PatchGrid.square(side, 2)}, budgets
    )
    assert torch.equal(keep, present)


def test_fastv_keeps_the_top_of_the_eager_attention_row(llava15_checkpoint, llava15_images) -> None:
    """LLaVA-1.5 geometry (576 tokens per image), two images in a prompt, left padding: the kept tokens of each
    image are its top-k by layer K-1's head-mean attention of the last prompt token in a stock eager run."""
    layer = 1
    processor = LlavaProcessor.from_pretrained(llava15_checkpoint)
    pruned = load_pruned(llava15_checkpoint, selector="fastv", prune_layer=layer, budget_mode="fixed", fixed_tokens=40)
    eager = LlavaForConditionalGeneration.from_pretrained(llava15_checkpoint, attn_implementation="eager").eval()
    prompts = ["USER: <image> describe ASSISTANT:", "USER: <image> and <image> compare them ASSISTANT:"]
    images = [llava15_images["busy"], llava15_images["plain"], llava15_images["shapes"]]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        kept = pruned(**inputs).kept_indices_by_layer[layer]
        attention = eager(**inputs, output_attentions=True).attentions[layer - 1][:, :, -1].mean(1)
    placeholders = inputs["input_ids"] == pruned.config.image_token_id
    rows = placeholders.nonzero()[:, 0].view(3, 576)[:, 0]
    per_image = attention[placeholders].view(3, 576)
    assert rows.tolist() == [0, 1, 1]
    for image in range(3):
        assert kept[image].tolist() == per_image[image].topk(40).indices.sort().values.tolist()
