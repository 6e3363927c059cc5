"""AutoPrune's pure parts against float64 loop references of the released formulas, and its schedule, mutual
information and errors on a model (its oracle runs in the method contract and in `test_language_stage`)."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from itertools import pairwise

import pytest
import torch
from support.oracle import assert_matches_layer_oracle, llava15_case, load_pruned

from adaprune.compat import output_cache
from adaprune.method_autoprune import (
    AMPLITUDE,
    REFERENCE_DEPTH,
    mutual_information,
    retention_schedule,
    text_relevance,
)
from adaprune.tools.tiny_llava import SMALL_GEOMETRY, save_tiny_llava


def released_mutual_information(block: list[list[float]], eps: float = 1e-6) -> float:
    """One head's MI as the released code computes it, on a Q x V block of attention probabilities."""
    n_rows = len(block)
    column_mean = [sum(row[column] for row in block) / n_rows for column in range(len(block[0]))]
    total = 0.0
    for row in block:
        for value, mean in zip(row, column_mean):
            total += value / n_rows * math.log2(max(value / (mean + n_rows * eps), eps))
    return total


def released_schedule(slope: float, first_keep: int, target: int, n_layers: int, midpoint: float) -> list[int]:
    """The released bisection (at most 200 steps, stopping at an exact match) without token recycling, in Python
    floats, with the curve stretched to `n_layers` as adaprune does."""

    def curve(layer: int) -> float:
        depth = layer * REFERENCE_DEPTH / n_layers
        return AMPLITUDE / (1 + math.exp(slope * (depth - (midpoint + slope))))

    def counts(scale: float) -> list[int]:
        result = [first_keep]
        for layer in range(1, n_layers):
            kept = min(math.ceil((first_keep - 1) * min(1.0, scale * curve(layer))), first_keep)
            result.append(min(kept, result[-1]))
        return result

    low, high, best, best_gap = 0.0, 20.0, 0.0, math.inf
    for _ in range(200):
        middle = (low + high) / 2
        total = sum(counts(middle))
        if abs(total - target * n_layers) < best_gap:
            best, best_gap = middle, abs(total - target * n_layers)
        if best_gap < 0.01:
            break
        if total < target * n_layers:
            low = middle
        else:
            high = middle
    return counts(best)


def random_attention(rng: torch.Generator, n_units: int, n_tokens: int, heads: int, rows: torch.Tensor):
    """(n, N, heads, Q) attention blocks: rows of a softmax over more keys than the visual ones, zero past each
    unit's rows."""
    n_rows = int(rows.max())
    logits = torch.randn(n_units, heads, n_rows, n_tokens + 7, generator=rng, dtype=torch.float64) * 2
    probabilities = logits.softmax(-1)[..., :n_tokens]
    valid = torch.arange(n_rows) < rows.view(-1, 1)
    return (probabilities * valid[:, None, :, None]).permute(0, 3, 1, 2)


def test_mutual_information_matches_the_released_formula() -> None:
    rng = torch.Generator().manual_seed(0)
    rows = torch.tensor([5, 1, 3])
    attention = random_attention(rng, 3, 9, 2, rows)
    ours = mutual_information(attention, rows)
    for unit in range(3):
        for head in range(2):
            block = attention[unit, :, head, : rows[unit]].T.tolist()
            assert float(ours[unit, head]) == pytest.approx(released_mutual_information(block), rel=1e-5, abs=1e-7)


def test_mutual_information_is_zero_when_every_text_row_looks_alike_and_grows_when_they_differ() -> None:
    same = torch.tensor([0.5, 0.3, 0.1, 0.1]).view(1, 4, 1, 1).expand(1, 4, 1, 3)
    assert float(mutual_information(same, torch.tensor([3])).abs().max()) < 1e-4  # 0 up to the epsilon terms
    different = torch.eye(4)[:3].T.reshape(1, 4, 1, 3) * 0.9
    assert float(mutual_information(different, torch.tensor([3]))) > 1.0


def test_text_relevance_averages_over_the_units_own_rows_and_the_heads() -> None:
    rng = torch.Generator().manual_seed(1)
    rows = torch.tensor([4, 2])
    attention = random_attention(rng, 2, 6, 3, rows)
    expected = torch.stack([attention[unit, :, :, : rows[unit]].mean(dim=(-1, -2)) for unit in range(2)])
    torch.testing.assert_close(text_relevance(attention, rows), expected.float())


@pytest.mark.parametrize("seed", range(4))
def test_schedules_equal_the_released_bisection_and_meet_the_budget(seed: int) -> None:
    rng = random.Random(seed)
    n_layers = rng.choice([4, 12, 32, 40])
    targets = [rng.randint(1, 200) for _ in range(6)]
    first_keep = [min(int(2.5 * target), rng.choice([576, 2880, 300])) for target in targets]
    slopes = [rng.choice([0.0, 0.4, rng.uniform(0, 0.4)]) for _ in targets]
    ours = retention_schedule(
        torch.tensor(slopes, dtype=torch.float64), torch.tensor(first_keep), torch.tensor(targets), n_layers, 14.9
    )
    for unit, (slope, keep, target) in enumerate(zip(slopes, first_keep, targets)):
        expected = released_schedule(slope, keep, target, n_layers, 14.9)
        assert ours[unit].tolist() == expected
        assert expected[0] == keep and all(later <= earlier for earlier, later in pairwise(expected))
        if keep < 576:  # far from the unit's size, the budget is met to rounding
            assert abs(sum(expected) - target * n_layers) <= n_layers


def test_a_target_the_released_scale_range_misses_is_met_by_widening_it() -> None:
    """On a steep curve over 32 layers, a large target needs a scale above the released bound of 20: the released
    search stops short of the budget, adaprune's meets it."""
    slope, first_keep, target = 0.4, 576, 500
    released = released_schedule(slope, first_keep, target, 32, 14.9)
    assert sum(released) < target * 32 - 32
    ours = retention_schedule(
        torch.tensor([slope], dtype=torch.float64), torch.tensor([first_keep]), torch.tensor([target]), 32, 14.9
    )[0]
    assert abs(int(ours.sum()) - target * 32) < 32 and ours[0] == first_keep


def test_a_target_out_of_reach_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError,
        match=r"cannot average 50 visual tokens per layer over 4 layers in budget unit 1, "
        r"which keeps 10 after layer 0 \(at most 9.25 per layer\)",
    ):
        retention_schedule(
            torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([40, 10]), torch.tensor([16, 50]), 4, 14.9
        )


def test_high_mutual_information_prunes_early_and_low_prunes_late() -> None:
    flat, steep = retention_schedule(
        torch.tensor([0.0, 0.4], dtype=torch.float64), torch.tensor([160, 160]), torch.tensor([64, 64]), 32, 14.9
    ).tolist()
    assert flat[1] <= 66 and max(flat[1:]) - min(flat[1:]) <= 1  # prune to about the target, then hold
    assert steep[8] > 100 and steep[-1] < 10  # keep many, cut late
    assert sum(steep) == 64 * 32
    assert abs(sum(flat) - 64 * 32) <= 31 / 2  # a flat schedule moves in steps of 31 tokens: the closest one


def test_llava15_geometry_schedules_per_image_match_the_oracle(llava15_checkpoint, llava15_images: dict) -> None:
    """576 tokens per image, vision width 1024, E-AdaPrune budgets: equal to the stock model with each cut's dropped
    tokens hidden from that layer on; the forward reports each image's schedule and mutual information, the first
    cut keeps 2.5 budgets, every later cut the schedule's count, and the schedules average the budgets."""
    stock, inputs = llava15_case(llava15_checkpoint, llava15_images)
    pruned = load_pruned(llava15_checkpoint, selector="autoprune", energy_ratio=0.9, min_tokens=4)

    assert_matches_layer_oracle(pruned, stock, inputs, max_new_tokens=3)
    with torch.no_grad():
        output = pruned(**inputs)
    report, budgets = output.selector_report, output.token_budgets
    n_layers = pruned.config.text_config.num_hidden_layers
    schedule = report["tokens_per_layer"]
    assert len(set(budgets.tolist())) == 3
    assert schedule.shape == (3, n_layers) and report["mutual_information"].shape == report["slope"].shape == (3,)
    assert schedule[:, 0].tolist() == torch.clamp(budgets * 5 // 2, max=576).tolist()
    for layer in range(1, n_layers):
        assert [len(kept) for kept in output.kept_indices_by_layer[layer]] == schedule[:, layer - 1].tolist()
    assert ((schedule.sum(-1) - budgets * n_layers).abs() <= n_layers).all()
    # each layer's cache holds what the schedule gave it: the longest row's text plus its images' counts
    placeholders = inputs["input_ids"] == pruned.config.image_token_id
    text = (inputs["attention_mask"].sum(-1) - placeholders.sum(-1)).tolist()
    images_of_rows = [[0], [1, 2]]
    counts = [torch.full((3,), 576), *schedule[:, :-1].T]
    expected = [max(t + int(c[images].sum()) for t, images in zip(text, images_of_rows)) for c in counts]
    cache = output_cache(output)
    assert [cache.get_seq_length(layer) for layer in range(n_layers)] == expected


def test_autoprune_needs_three_decoder_layers(tmp_path) -> None:
    checkpoint = save_tiny_llava(tmp_path, replace(SMALL_GEOMETRY, text_layers=2))
    with pytest.raises(ValueError, match=r"'autoprune' .* at least 3 layers, got 2; use 'fastv' or 'adaptprune'"):
        load_pruned(checkpoint, selector="autoprune")
