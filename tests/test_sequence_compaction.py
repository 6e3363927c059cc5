"""Compaction plans and position ids (`adaprune.sequence_compaction`) against plain Python references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaprune.sequence_compaction import (
    POSITION_POLICIES,
    Compaction,
    CompactionPlan,
    compacted_position_ids,
    default_position_ids,
    images_per_row,
    left_compaction,
    placeholder_keep_flags,
    prefill_state,
)

SEEDS = range(12)


def kept_positions(keep: torch.Tensor) -> list[list[int]]:
    """The True positions of each row, in order."""
    return [[position for position, flag in enumerate(row) if flag] for row in keep.tolist()]


def right_aligned(rows: list[list[int]], pad: int) -> list[list[int]]:
    """Rows padded on the left with `pad` to the longest row's length."""
    width = max(map(len, rows), default=0)
    return [[pad] * (width - len(row)) + row for row in rows]


def reference_plan(keep: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """(source_index, attention_mask) of the left-padded compaction of `keep`."""
    kept = kept_positions(keep)
    return right_aligned(kept, -1), right_aligned([[1] * len(row) for row in kept], 0)


def reference_positions(
    keep: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None, policy: str
) -> list[list[int]]:
    """Compacted position ids: each kept token's position (real tokens up to it - 1 by default), less the
    dropped real tokens before it under "compact"; 0 at padding."""
    mask = attention_mask.tolist()
    rows = []
    for row, kept in enumerate(kept_positions(keep)):
        positions = []
        for position in kept:
            value = sum(mask[row][: position + 1]) - 1 if position_ids is None else int(position_ids[row, position])
            if policy == "compact":
                value -= sum(mask[row][earlier] and earlier not in kept for earlier in range(position))
            positions.append(value)
        rows.append(positions)
    return right_aligned(rows, 0)


def random_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded attention mask (B in 1..4, random length and padding) and a keep mask inside it."""
    rng = np.random.default_rng(seed)
    batch, length = int(rng.integers(1, 5)), int(rng.integers(1, 13))
    padding = rng.integers(0, length, batch)
    attention_mask = torch.from_numpy(np.arange(length) >= padding[:, None]).long()
    keep = attention_mask.bool() & torch.from_numpy(rng.random((batch, length)) < rng.uniform(0.2, 0.9, (batch, 1)))
    return attention_mask, keep


@pytest.mark.parametrize("seed", SEEDS)
def test_left_compaction_matches_reference(seed: int) -> None:
    """Kept positions in order, right-aligned, padded on the left with source -1 and attention 0."""
    _, keep = random_batch(seed)
    plan = left_compaction(keep)
    source_index, attention_mask = reference_plan(keep)
    assert plan.source_index.tolist() == source_index
    assert plan.attention_mask.tolist() == attention_mask
    assert plan.is_padding.tolist() == [[index < 0 for index in row] for row in source_index]


def test_left_compaction_of_an_all_dropped_row_and_an_empty_batch() -> None:
    """A row keeping nothing is all padding; no rows gives (0, 0)."""
    keep = torch.tensor([[False, False, False], [True, False, True]])
    plan = left_compaction(keep)
    assert (plan.source_index.tolist(), plan.attention_mask.tolist()) == reference_plan(keep)
    empty = left_compaction(torch.zeros(0, 4, dtype=torch.bool))
    assert empty.source_index.shape == empty.attention_mask.shape == (0, 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_gather_compacts_two_and_three_dimensional_tensors(seed: int) -> None:
    """(B, L) and (B, L, D) tensors: values at the source positions, pad_value at padding."""
    _, keep = random_batch(seed)
    plan = left_compaction(keep)
    labels = torch.randint(0, 1000, keep.shape)
    embeddings = torch.randn(*keep.shape, 3)
    for values, pad_value in ((labels, -100), (embeddings, 0.5)):
        gathered = plan.gather(values, pad_value=pad_value)
        flat = values.reshape(*keep.shape, -1)
        expected = [
            [flat[row, index].tolist() if index >= 0 else [pad_value] * flat.shape[-1] for index in sources]
            for row, sources in enumerate(plan.source_index.tolist())
        ]
        assert gathered.shape == (*plan.source_index.shape, *values.shape[2:])
        assert gathered.reshape(*plan.source_index.shape, -1).tolist() == expected


def test_gather_pads_with_zero_by_default() -> None:
    """Without pad_value, padding positions are 0."""
    plan = left_compaction(torch.tensor([[True, True], [False, True]]))
    assert plan.gather(torch.tensor([[5, 6], [7, 8]])).tolist() == [[5, 6], [0, 8]]


@pytest.mark.parametrize("seed", range(5))
def test_placeholder_keep_flags_mark_each_images_kept_tokens(seed: int) -> None:
    """Images follow one another: image i's kept index j flags placeholder (tokens before image i) + j."""
    rng = np.random.default_rng(seed)
    tokens_per_image = rng.integers(1, 10, int(rng.integers(1, 5))).tolist()
    kept = [np.flatnonzero(rng.random(tokens) < 0.5).tolist() for tokens in tokens_per_image]
    flags = placeholder_keep_flags([torch.tensor(indices, dtype=torch.long) for indices in kept], tokens_per_image)
    expected = [index in indices for tokens, indices in zip(tokens_per_image, kept) for index in range(tokens)]
    assert flags.dtype == torch.bool
    assert flags.tolist() == expected


def test_placeholder_keep_flags_without_images() -> None:
    """No images: no flags."""
    assert placeholder_keep_flags([], []).shape == (0,)


@pytest.mark.parametrize("images_in_rows", [[0, 1, 2], [2, 0, 0, 1], [1], [0]])
def test_images_per_row_groups_consecutive_images(images_in_rows: list[int]) -> None:
    """Rows holding 0, 1 or 2 images of different sizes get consecutive ranges of image indices."""
    tokens_per_image = [3 + image for image in range(sum(images_in_rows))]
    starts = np.cumsum([0, *images_in_rows]).tolist()
    placeholders = [sum(tokens_per_image[start:stop]) for start, stop in zip(starts, starts[1:])]
    groups = images_per_row(placeholders, tokens_per_image)
    assert groups == [range(start, stop) for start, stop in zip(starts, starts[1:])]


@pytest.mark.parametrize(
    ("placeholders", "tokens_per_image", "message"),
    [
        ([6], [4, 4], r"row 0 has 6 image placeholder tokens, which is not a whole number of images of \[4, 4\]"),
        ([4, 3], [4, 4], r"row 1 has 3 image placeholder tokens, which is not a whole number of images of \[4\]"),
        ([4, 8], [4, 4], r"row 1 has 8 image placeholder tokens, more than the images left for it provide \(\[4\]"),
        ([4], [4, 4], r"placeholders for 1 images but 2 images were given"),
        ([0, 0], [5], r"placeholders for 0 images but 1 images were given"),
    ],
)
def test_images_per_row_rejects_mismatched_placeholders(
    placeholders: list[int], tokens_per_image: list[int], message: str
) -> None:
    """Partial images, too few images and extra images are errors."""
    with pytest.raises(ValueError, match=message):
        images_per_row(placeholders, tokens_per_image)


@pytest.mark.parametrize("seed", SEEDS)
def test_default_position_ids_count_real_tokens(seed: int) -> None:
    """Real token count so far - 1 at real tokens, 0 at padding (also with holes in the mask)."""
    attention_mask, keep = random_batch(seed)
    for mask in (attention_mask, keep.long()):
        rows = mask.tolist()
        expected = [[sum(row[: index + 1]) - 1 if flag else 0 for index, flag in enumerate(row)] for row in rows]
        assert default_position_ids(mask).tolist() == expected


@pytest.mark.parametrize("policy", POSITION_POLICIES)
@pytest.mark.parametrize("seed", SEEDS)
def test_compacted_position_ids_match_reference(seed: int, policy: str) -> None:
    """Default and explicit (B, L) position ids under both policies."""
    attention_mask, keep = random_batch(seed)
    plan = left_compaction(keep)
    explicit = torch.randint(0, 50, attention_mask.shape)
    for position_ids in (None, explicit):
        positions = compacted_position_ids(plan, keep, attention_mask, position_ids, policy)
        assert positions.tolist() == reference_positions(keep, attention_mask, position_ids, policy)


@pytest.mark.parametrize("seed", SEEDS)
def test_default_positions_of_both_policies(seed: int) -> None:
    """Without position ids, 'compact' is the cumsum of the compacted mask - 1 (as if only the kept tokens
    existed) and 'original' is each kept token's cumsum of the original mask - 1; 0 at padding."""
    attention_mask, keep = random_batch(seed)
    plan = left_compaction(keep)
    new_mask = plan.attention_mask.tolist()
    compact = [[sum(row[: index + 1]) - 1 if row[index] else 0 for index in range(len(row))] for row in new_mask]
    uncompacted = (attention_mask.cumsum(-1) - 1).tolist()
    original = [
        [uncompacted[row][index] if index >= 0 else 0 for index in sources]
        for row, sources in enumerate(plan.source_index.tolist())
    ]
    assert compacted_position_ids(plan, keep, attention_mask, None, "compact").tolist() == compact
    assert compacted_position_ids(plan, keep, attention_mask, None, "original").tolist() == original


@pytest.mark.parametrize("policy", POSITION_POLICIES)
def test_compacted_position_ids_broadcast_a_single_row(policy: str) -> None:
    """Position ids of shape (1, L) apply to every row, as if expanded to (B, L)."""
    attention_mask, keep = random_batch(3)
    plan = left_compaction(keep)
    shared = (torch.arange(attention_mask.shape[1]) + 7).unsqueeze(0)
    positions = compacted_position_ids(plan, keep, attention_mask, shared, policy)
    expanded = shared.expand_as(attention_mask)
    assert positions.tolist() == reference_positions(keep, attention_mask, expanded, policy)
    assert torch.equal(positions, compacted_position_ids(plan, keep, attention_mask, expanded.clone(), policy))


def test_compacted_position_ids_reject_unknown_policy() -> None:
    """An unknown policy is rejected with the valid ones."""
    keep = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"position_policy must be one of \('compact', 'original'\), got 'x'"):
        compacted_position_ids(left_compaction(keep), keep, keep.long(), None, "x")


def test_plans_compose_with_a_second_compaction() -> None:
    """Compacting a compacted batch again maps back to the original positions through both plans."""
    attention_mask, keep = random_batch(5)
    first = left_compaction(keep)
    second_keep = first.attention_mask.bool() & (torch.arange(first.source_index.shape[1]) % 2 == 0)
    second = left_compaction(second_keep)
    through_both = second.gather(first.source_index, pad_value=-1)
    composed = CompactionPlan(source_index=through_both, attention_mask=second.attention_mask)
    values = torch.randn(*attention_mask.shape, 2)
    assert torch.equal(second.gather(first.gather(values)), composed.gather(values))
    assert torch.equal(first.then(second).source_index, through_both)
    assert torch.equal(first.then(second).gather(values), second.gather(first.gather(values)))


@pytest.mark.parametrize("policy", POSITION_POLICIES)
def test_pruning_state_maps_later_steps_at_every_layer(policy: str) -> None:
    """A state with a compaction before the language model and one at layer 3: a later step's caller-layout mask
    becomes, per layer, the gathered prefix plus the new columns; positions move back by the dropped count
    ("compact") or stay ("original")."""
    attention_mask, keep = random_batch(7)
    first = left_compaction(keep)
    second = left_compaction(first.attention_mask.bool() & (torch.arange(first.source_index.shape[1]) % 3 != 1))
    state = prefill_state(first, keep, attention_mask, policy).then(Compaction(3, second))
    batch, length = attention_mask.shape
    caller_mask = torch.cat([attention_mask, torch.ones(batch, 4, dtype=torch.long)], dim=1)  # 2 cached, 2 new
    positions = default_position_ids(caller_mask)[:, -2:]
    dropped = (attention_mask.bool() & ~keep).sum(-1, keepdim=True)
    for layer, plan in ((0, first), (2, first), (3, first.then(second)), (9, first.then(second))):
        cache_length = plan.source_index.shape[1] + 2
        assert state.covered_length(cache_length, layer) == length + 2
        mask, moved = state.step_inputs(caller_mask, positions, (batch, 2), cache_length, layer)
        assert torch.equal(mask, torch.cat([plan.gather(attention_mask), torch.ones(batch, 4, dtype=torch.long)], 1))
        assert torch.equal(moved, positions - (dropped if policy == "compact" else 0))
    with pytest.raises(ValueError, match=rf"expected shape \({batch}, {length + 4}\)"):
        state.step_inputs(caller_mask[:, 1:], positions, (batch, 2), first.source_index.shape[1] + 2)
    with pytest.raises(ValueError, match=rf"holds {batch} sequences, and the inputs have {batch + 1}"):
        state.step_inputs(None, None, (batch + 1, 2), first.source_index.shape[1] + 2)
    with pytest.raises(ValueError, match="fewer than its pruned prefill"):
        state.covered_length(first.source_index.shape[1] - 1)
    with pytest.raises(ValueError, match="compactions go deeper"):
        state.then(Compaction(2, second))
