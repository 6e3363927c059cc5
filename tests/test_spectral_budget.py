"""Spectral budgets (`adaprune.spectral_budget`) against an independent float64 NumPy SVD reference.

The reference applies the module docstring's round-off rules: squared singular values <= sqrt(N) * eps32 * s_1^2
count as zero, and a matrix whose (centred) energy is <= N * eps32^2 * ||X||_F^2 (uncentred) has a flat curve of
ones.
Ratios are taken halfway between consecutive reference curve values, so float32 rounding cannot flip a budget and
budgets are compared exactly.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from support.spectra import gaussian, reference_curve, round_off_factor, with_spectrum

from adaprune.spectral_budget import budgets_from_curves, energy_curves

CURVE_TOLERANCE = 1e-5


def reference_budget(curve: np.ndarray, energy_ratio: float, min_tokens: int = 1, max_tokens: int | None = None) -> int:
    """Smallest k with E(k) >= ratio, clamped to [min_tokens, min(max_tokens, N)] (the upper bound wins)."""
    upper = curve.size if max_tokens is None else min(max_tokens, curve.size)
    smallest = int(np.argmax(curve >= energy_ratio)) + 1
    return min(max(smallest, min_tokens), upper)


def midpoint_ratio(curve: np.ndarray, k: int) -> float:
    """A ratio halfway between E(k-1) (E(0) = 0) and E(k): its budget is k, far from any float32 tie."""
    lower = curve[k - 2] if k > 1 else 0.0
    return float((lower + curve[k - 1]) / 2)


def budget(features: torch.Tensor, energy_ratio: float, **kwargs: Any) -> int:
    """The package's budget of one (N, d) matrix; kwargs go to `energy_curves` or `budgets_from_curves`."""
    clamps = {key: kwargs.pop(key) for key in ("min_tokens", "max_tokens") if key in kwargs}
    curves = energy_curves(features.unsqueeze(0), **kwargs)
    return int(budgets_from_curves(curves, energy_ratio, **clamps)[0])


def assert_matches_reference(
    features: torch.Tensor, rng: np.random.Generator, center: bool, n_ratios: int = 8, **solver: object
) -> None:
    """Each image's curve is the reference's within 1e-5; budgets equal it at midpoint ratios of random k."""
    curves = energy_curves(features, center=center, **solver)
    for image, matrix in enumerate(features):
        curve = reference_curve(matrix, center)
        np.testing.assert_allclose(curves[image].numpy(), curve, rtol=0, atol=CURVE_TOLERANCE)
        rank = reference_budget(curve, 1.0)
        for k in rng.choice(np.arange(1, rank + 1), size=min(n_ratios, rank), replace=False):
            ratio = midpoint_ratio(curve, int(k))
            assert reference_budget(curve, ratio) == k
            assert int(budgets_from_curves(curves[image : image + 1], ratio)[0]) == k, (image, k)


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """These matrices are small: one intra-op thread avoids OpenMP spin-waiting on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded per test, so cases are reproducible and independent of test order."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("shape", [(64, 96), (96, 40), (33, 33), (2, 5)])
def test_gaussian_curves_and_budgets_match_reference(
    rng: np.random.Generator, shape: tuple[int, int], center: bool
) -> None:
    """Random matrices with fewer and more tokens than channels, one image and a batch of three."""
    assert_matches_reference(gaussian(rng, 1, *shape), rng, center)
    assert_matches_reference(gaussian(rng, 3, *shape), rng, center)


def test_llava_sized_matrix_matches_reference(rng: np.random.Generator) -> None:
    """One LLaVA-1.5 sized image: 576 tokens x 1024 channels."""
    assert_matches_reference(gaussian(rng, 1, 576, 1024), rng, center=True, n_ratios=16)


@pytest.mark.parametrize("solver", [{"solver": "exact"}, {"solver": "randomized", "randomized_rank": 6}])
@pytest.mark.parametrize("shape", [(64, 96), (96, 40)])
def test_batch_equals_each_image_alone(rng: np.random.Generator, shape: tuple[int, int], solver: dict) -> None:
    """Budgets of a batch equal the budgets of each image computed alone, at every image's midpoint ratios."""
    features = gaussian(rng, 4, *shape) * torch.linspace(3.0, 0.2, shape[1])
    batched = energy_curves(features, **solver)
    alone = torch.cat([energy_curves(matrix.unsqueeze(0), **solver) for matrix in features])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)
    for image in range(features.shape[0]):
        curve = batched[image].double().numpy()
        for k in rng.choice(np.arange(1, 12), size=4, replace=False):
            ratio = midpoint_ratio(curve, int(k))
            assert torch.equal(budgets_from_curves(batched, ratio), budgets_from_curves(alone, ratio))


@pytest.mark.parametrize("with_mean", [False, True])
@pytest.mark.parametrize(("n_tokens", "n_channels", "rank"), [(64, 96, 5), (96, 40, 12), (50, 50, 1), (40, 64, 39)])
def test_exact_low_rank_gives_its_rank_at_ratio_one(
    rng: np.random.Generator, n_tokens: int, n_channels: int, rank: int, with_mean: bool
) -> None:
    """Rank-r matrices (singular values in [1, 10]) get r; an added mean row adds one dimension when uncentred."""
    mean_norm = 5.0 / np.sqrt(n_tokens) if with_mean else 0.0
    features = with_spectrum(rng, n_tokens, n_channels, np.geomspace(10.0, 1.0, rank), mean_norm)
    for center, expected in ((True, rank), (False, rank + with_mean)):
        assert reference_budget(reference_curve(features, center), 1.0) == expected
        assert budget(features, 1.0, center=center) == expected
    assert_matches_reference(features.unsqueeze(0), rng, center=True)
    assert_matches_reference(features.unsqueeze(0), rng, center=False)


@pytest.mark.parametrize("min_tokens", [1, 4])
@pytest.mark.parametrize("n_tokens", [7, 49, 576])
def test_constant_matrix_gets_min_tokens(rng: np.random.Generator, n_tokens: int, min_tokens: int) -> None:
    """All rows equal: no energy once centred, rank one uncentred; both give min_tokens (1 clamped up)."""
    row = gaussian(rng, 1, 32) * 100.0 + 50.0
    features = row.expand(n_tokens, -1).contiguous()
    centered_curve = energy_curves(features.unsqueeze(0))[0]
    assert torch.equal(centered_curve, torch.ones(n_tokens))
    for center in (True, False):
        expected = reference_budget(reference_curve(features, center), 1.0, min_tokens=min_tokens)
        assert expected == min_tokens
        assert budget(features, 1.0, center=center, min_tokens=min_tokens) == expected


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize(("n_tokens", "n_channels", "distinct"), [(64, 96, 5), (96, 40, 9), (30, 30, 2)])
def test_duplicated_rows_bound_the_budget(
    rng: np.random.Generator, n_tokens: int, n_channels: int, distinct: int, center: bool
) -> None:
    """Only m distinct rows: the budget at ratio 1 is the reference's numerical rank, at most m."""
    rows = gaussian(rng, distinct, n_channels)
    which = torch.from_numpy(rng.permutation(np.arange(n_tokens) % distinct))
    features = rows[which]
    expected = reference_budget(reference_curve(features, center), 1.0)
    assert expected == distinct - center
    assert budget(features, 1.0, center=center) == expected <= distinct
    assert_matches_reference(features.unsqueeze(0), rng, center)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("min_tokens", [1, 3])
def test_zero_matrix_gets_min_tokens(center: bool, min_tokens: int, solver: str) -> None:
    """An all-zero image has a flat curve of ones and gets min_tokens at any ratio."""
    features = torch.zeros(1, 20, 8)
    curves = energy_curves(features, center=center, solver=solver, randomized_rank=4)
    assert torch.equal(curves, torch.ones(1, 20))
    np.testing.assert_array_equal(reference_curve(features[0], center), np.ones(20))
    for ratio in (1e-6, 0.5, 1.0):
        assert int(budgets_from_curves(curves, ratio, min_tokens=min_tokens)[0]) == min_tokens


@pytest.mark.parametrize("min_tokens", [1, 5])
@pytest.mark.parametrize("center", [True, False])
def test_tiny_ratio_gives_one_token(rng: np.random.Generator, center: bool, min_tokens: int) -> None:
    """A ratio of 1e-6 is reached by the first component: budget 1, clamped up to min_tokens."""
    features = gaussian(rng, 48, 64)
    expected = reference_budget(reference_curve(features, center), 1e-6, min_tokens=min_tokens)
    assert expected == min_tokens
    assert budget(features, 1e-6, center=center, min_tokens=min_tokens) == expected


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("shape", [(64, 96), (96, 40), (40, 40)])
def test_ratio_one_on_full_rank_matrix_gives_numerical_rank(
    rng: np.random.Generator, shape: tuple[int, int], center: bool
) -> None:
    """Gaussian matrices have full rank: min(N, d), less one for N <= d once centred (centring loses a row)."""
    features = gaussian(rng, *shape)
    expected = reference_budget(reference_curve(features, center), 1.0)
    assert expected == min(shape[0] - center, shape[1])
    assert budget(features, 1.0, center=center) == expected


@pytest.mark.parametrize(
    ("min_tokens", "max_tokens"), [(1, None), (10, None), (1, 3), (5, 5), (1, 10_000), (1000, None), (30, 20)]
)
def test_min_and_max_clamps(rng: np.random.Generator, min_tokens: int, max_tokens: int | None) -> None:
    """Budgets are clamped to [min_tokens, min(max_tokens, N)], the upper bound winning a conflict."""
    features = gaussian(rng, 64, 96)
    curves = energy_curves(features.unsqueeze(0))
    curve = reference_curve(features)
    for k in (1, 2, 4, 8, 16, 32, 63):
        ratio = midpoint_ratio(curve, k)
        expected = reference_budget(curve, ratio, min_tokens, max_tokens)
        assert int(budgets_from_curves(curves, ratio, min_tokens=min_tokens, max_tokens=max_tokens)[0]) == expected


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_matches_float32(rng: np.random.Generator, dtype: torch.dtype, solver: str) -> None:
    """Spectra of float16 / bfloat16 features are computed in float32: same curves as the float32 copy."""
    low = gaussian(rng, 3, 64, 48).to(dtype)
    curves = energy_curves(low, solver=solver, randomized_rank=8)
    float_curves = energy_curves(low.float(), solver=solver, randomized_rank=8)
    assert curves.dtype == torch.float32
    assert torch.equal(curves, float_curves)
    for ratio in (0.3, 0.6, 0.9, 1.0):
        assert torch.equal(budgets_from_curves(curves, ratio), budgets_from_curves(float_curves, ratio))


def test_busy_image_gets_a_larger_budget_than_a_plain_one(rng: np.random.Generator) -> None:
    """Smooth 2-D sinusoids over an 8x8 grid (low rank) need fewer tokens than the same plus strong noise."""
    y, x = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    waves = ((1, 0, 0.3), (0, 1, 1.1), (1, 1, 2.0))  # (x frequency, y frequency, phase)
    basis = np.stack([np.sin(2 * np.pi * (fx * x + fy * y) / 8 + phase) for fx, fy, phase in waves], -1).reshape(64, -1)
    plain = basis @ rng.standard_normal((basis.shape[1], 32))
    busy = plain + 2.0 * rng.standard_normal(plain.shape)
    features = torch.from_numpy(np.stack([plain, busy]).astype(np.float32))
    budgets = budgets_from_curves(energy_curves(features), 0.9)
    assert budgets.tolist() == [reference_budget(reference_curve(matrix), 0.9) for matrix in features]
    assert budgets[1] > budgets[0]


@pytest.mark.parametrize("shape", [(64, 96), (48, 48), (40, 200)])
def test_randomized_equals_exact_when_rank_covers_the_budget(rng: np.random.Generator, shape: tuple[int, int]) -> None:
    """Singular values 2**-i (i < 8): with randomized_rank >= the budget the randomized budget is the exact one."""
    features = torch.stack([with_spectrum(rng, *shape, 2.0 ** -np.arange(8)) for _ in range(3)])
    exact = energy_curves(features)
    for image, matrix in enumerate(features):
        curve = reference_curve(matrix)
        assert reference_budget(curve, 1.0) == 8
        for k in range(1, 9):
            ratio = midpoint_ratio(curve, k)
            assert int(budgets_from_curves(exact[image : image + 1], ratio)[0]) == k
            for rank in (k, k + 3):
                randomized = energy_curves(matrix.unsqueeze(0), solver="randomized", randomized_rank=rank)
                assert int(budgets_from_curves(randomized, ratio)[0]) == k, (image, k, rank)


@pytest.mark.parametrize("power_iterations", [0, 2])
@pytest.mark.parametrize("shape", [(64, 96), (96, 40), (200, 64)])
def test_randomized_over_estimates_past_its_rank(
    rng: np.random.Generator, shape: tuple[int, int], power_iterations: int
) -> None:
    """Past the computed rank the flat-tail estimate can only raise a budget, and never above N."""
    rank = 4
    features = gaussian(rng, 3, *shape) * torch.linspace(3.0, 0.1, shape[1])
    exact = energy_curves(features)
    randomized = energy_curves(
        features, solver="randomized", randomized_rank=rank, randomized_power_iterations=power_iterations
    )
    compared = 0
    for ratio in np.linspace(0.05, 1.0, 40):
        exact_budgets = budgets_from_curves(exact, float(ratio))
        randomized_budgets = budgets_from_curves(randomized, float(ratio))
        past_rank = exact_budgets > rank
        assert (randomized_budgets[past_rank] >= exact_budgets[past_rank]).all(), ratio
        assert (randomized_budgets <= shape[0]).all()
        compared += int(past_rank.sum())
    assert compared > 0


def test_randomized_is_deterministic_and_leaves_the_global_rng_alone(rng: np.random.Generator) -> None:
    """Fixed-seed sketch: equal results on repeated calls, and torch's global RNG state is untouched."""
    features = gaussian(rng, 3, 64, 96)
    state = torch.get_rng_state()
    first = energy_curves(features, solver="randomized", randomized_rank=8)
    second = energy_curves(features, solver="randomized", randomized_rank=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second)


def curve_cases(rng: np.random.Generator) -> list[torch.Tensor]:
    """Varied (1, N, d) inputs: Gaussian, low rank, constant, zero, duplicated rows, fast-decaying spectrum."""
    return [
        gaussian(rng, 1, 64, 96),
        gaussian(rng, 1, 96, 40),
        with_spectrum(rng, 50, 70, np.geomspace(10.0, 1.0, 6), mean_norm=3.0).unsqueeze(0),
        gaussian(rng, 1, 1, 16).expand(1, 30, 16).contiguous(),
        torch.zeros(1, 12, 5),
        gaussian(rng, 3, 20)[torch.arange(40) % 3].unsqueeze(0),
        with_spectrum(rng, 40, 40, 2.0 ** -np.arange(39)).unsqueeze(0),
    ]


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_curves_are_non_decreasing_and_end_at_one(rng: np.random.Generator, solver: str, center: bool) -> None:
    """Every curve has shape (n, N), never decreases, and its last value is exactly 1.0."""
    for features in curve_cases(rng):
        curves = energy_curves(features, center=center, solver=solver, randomized_rank=5)
        assert curves.shape == features.shape[:2]
        assert (curves.diff(dim=-1) >= 0).all()
        assert (curves[..., -1] == 1.0).all()


def test_invalid_solver_raises() -> None:
    """An unknown solver name is rejected with the valid names."""
    with pytest.raises(ValueError, match="'exact' or 'randomized'.*'svd'"):
        energy_curves(torch.randn(1, 8, 4), solver="svd")


def test_two_dimensional_input_raises() -> None:
    """A single (N, d) matrix is rejected: the batch dimension is required."""
    with pytest.raises(ValueError, match=r"\(images, tokens, channels\).*\(8, 4\)"):
        energy_curves(torch.randn(8, 4))


@pytest.mark.parametrize("shape", [(400, 100), (100, 400)])
def test_round_off_energy_counts_as_zero_whatever_the_shape(shape: tuple[int, int]) -> None:
    """One strong component plus components at half the round-off threshold (s_i^2 <= sqrt(N) eps32 s_1^2).

    The documented rule makes them zero energy, so the curve is all ones and ratio 1 gives one token, whether
    the matrix has fewer or more tokens than channels.
    """
    n_tokens, n_channels = shape
    rank = min(n_tokens - 1, n_channels)
    small = np.sqrt(round_off_factor(n_tokens) / 2)
    features = with_spectrum(np.random.default_rng(7), n_tokens, n_channels, np.r_[1.0, np.full(rank - 1, small)])
    curve = reference_curve(features)
    np.testing.assert_array_equal(curve, np.ones(n_tokens))
    np.testing.assert_allclose(energy_curves(features.unsqueeze(0))[0].numpy(), curve, rtol=0, atol=CURVE_TOLERANCE)
    assert budget(features, 1.0) == reference_budget(curve, 1.0) == 1
