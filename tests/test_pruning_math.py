"""Pruning maths: exact mask counts, lowest scores pruned, N:M groups, Wanda scores, SparseGPT against textbook OBS."""

import pytest
import torch

from conftest import assert_close_scaled
from slimformer.methods.obs import sparsegpt_prune
from slimformer.methods.pruning_math import (
    apply_mask,
    mask_global,
    mask_n_m,
    mask_per_matrix,
    mask_per_row,
    parse_pattern,
    wanda_scores,
)

ROWS, COLS = 16, 32


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def calibration(n: int = 128, seed: int = 0) -> torch.Tensor:
    """(n, COLS) correlated inputs with uneven feature scales, as in a transformer's activations."""
    g = generator(seed)
    X = torch.randn(n, COLS, generator=g) @ torch.randn(COLS, COLS, generator=g)
    return X * (0.25 + 4 * torch.rand(COLS, generator=g))


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]


def weight(seed: int = 1) -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=generator(seed))


def assert_lowest_pruned(score: torch.Tensor, mask: torch.Tensor) -> None:
    """Within one comparison group (flattened), no pruned score exceeds a kept one."""
    pruned, kept = score[mask], score[~mask]
    if pruned.numel() and kept.numel():
        assert pruned.max() <= kept.min()


# --- patterns ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "expected"), [(None, None), ("unstructured", None), ("2:4", (2, 4)), ("4:8", (4, 8))]
)
def test_parse_pattern(pattern, expected):
    assert parse_pattern(pattern) == expected


@pytest.mark.parametrize("pattern", ["2-4", "0:4", "4:4", "5:4", "a:b", "2:4:8", "", "2:"])
def test_parse_pattern_rejects_malformed(pattern):
    with pytest.raises(ValueError, match="N:M"):
        parse_pattern(pattern)


# --- masks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 1.0])
def test_mask_per_row_prunes_lowest_of_each_row(sparsity):
    score = torch.rand(ROWS, COLS, generator=generator(0))
    mask = mask_per_row(score, sparsity)
    assert mask.dtype == torch.bool and mask.shape == score.shape
    assert (mask.sum(dim=1) == int(COLS * sparsity)).all()
    for row in range(ROWS):
        assert_lowest_pruned(score[row], mask[row])


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 1.0])
def test_mask_per_matrix_prunes_lowest_of_matrix(sparsity):
    score = torch.rand(ROWS, COLS, generator=generator(0))
    mask = mask_per_matrix(score, sparsity)
    assert mask.shape == score.shape and mask.sum() == int(ROWS * COLS * sparsity)
    assert_lowest_pruned(score, mask)
    if 0 < sparsity < 1:
        assert mask.sum(dim=1).unique().numel() > 1  # one threshold for the matrix, not a count per row


def test_masks_are_exact_and_deterministic_under_ties():
    score = torch.randint(0, 3, (ROWS, COLS), generator=generator(0)).float()
    row, matrix = mask_per_row(score, 0.5), mask_per_matrix(score, 0.5)
    assert torch.equal(row, mask_per_row(score.clone(), 0.5))
    assert torch.equal(matrix, mask_per_matrix(score.clone(), 0.5))
    assert (row.sum(dim=1) == COLS // 2).all() and matrix.sum() == ROWS * COLS // 2
    # All-equal scores: still exactly the requested count in every row.
    assert (mask_per_row(torch.ones(2, 8), 0.25).sum(dim=1) == 2).all()


def test_mask_global_one_threshold_over_all_matrices():
    g = generator(0)
    scores = [torch.rand(ROWS, COLS, generator=g), 3 * torch.rand(8, COLS, generator=g), torch.rand(COLS, generator=g)]
    masks = mask_global(scores, 0.4)
    assert [m.shape for m in masks] == [s.shape for s in scores]
    total = sum(s.numel() for s in scores)
    assert sum(int(m.sum()) for m in masks) == int(total * 0.4)
    assert_lowest_pruned(torch.cat([s.flatten() for s in scores]), torch.cat([m.flatten() for m in masks]))
    assert masks[1].float().mean() < masks[0].float().mean()  # the larger-scored matrix loses fewer weights


def test_mask_global_ties_do_not_overshoot():
    scores = [torch.zeros(4, 8), torch.zeros(2, 8)]
    masks = mask_global(scores, 0.5)
    assert sum(int(m.sum()) for m in masks) == 24
    assert all(torch.equal(a, b) for a, b in zip(masks, mask_global(scores, 0.5)))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_mask_n_m_every_group(n, m):
    score = torch.rand(ROWS, COLS, generator=generator(0))
    mask = mask_n_m(score, n, m)
    groups, mask_groups = score.view(ROWS, COLS // m, m), mask.view(ROWS, COLS // m, m)
    assert (mask_groups.sum(dim=-1) == m - n).all()
    for r in range(ROWS):
        for c in range(COLS // m):
            assert_lowest_pruned(groups[r, c], mask_groups[r, c])
    ties = mask_n_m(torch.zeros(ROWS, COLS), n, m)
    assert (ties.view(ROWS, -1, m).sum(dim=-1) == m - n).all()
    assert torch.equal(ties, mask_n_m(torch.zeros(ROWS, COLS), n, m))


def test_mask_n_m_needs_divisible_width():
    with pytest.raises(ValueError, match=r"30.*M=4"):
        mask_n_m(torch.rand(4, 30), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        mask_n_m(torch.rand(4, 32), 4, 4)


def test_apply_mask_zeroes_in_place():
    W = weight()
    mask = mask_per_matrix(W.abs(), 0.5)
    kept = W[~mask].clone()
    apply_mask(W, mask)
    assert (W[mask] == 0).all() and torch.equal(W[~mask], kept)


# --- Wanda ------------------------------------------------------------------------------------------------


def test_wanda_scores_match_weight_times_input_norm():
    W, X = weight(), calibration()
    expected = torch.stack([W[:, j].abs() * torch.linalg.vector_norm(X[:, j]) for j in range(COLS)], dim=1)
    torch.testing.assert_close(wanda_scores(W, (X**2).sum(dim=0)), expected)


# --- SparseGPT --------------------------------------------------------------------------------------------


def obs_reference(W, H, sparsity, n_m, blocksize, percdamp=0.01):
    """Textbook OBS in float64: an explicit inverse Hessian, from which each column is eliminated once fixed."""
    W, H = W.double().clone(), H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * H.diagonal().mean() * torch.eye(COLS, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    mask = torch.zeros_like(W, dtype=torch.bool)

    def denominators(j0, j1):
        # OBS denominator of column j once the columns before it are fixed: [(H on columns j..)^-1]_jj.
        return torch.stack([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(j0, j1)])

    for j in range(COLS):
        if n_m is None and j % blocksize == 0:
            j1 = min(j + blocksize, COLS)
            score = (W[:, j:j1] ** 2 / denominators(j, j1)).flatten()
            block = torch.zeros_like(score, dtype=torch.bool)
            block[score.argsort()[: int(score.numel() * sparsity)]] = True
            mask[:, j:j1] = block.view(ROWS, -1)
        if n_m is not None and j % n_m[1] == 0:
            n, m = n_m
            score = W[:, j : j + m] ** 2 / denominators(j, j + m)
            lowest = score.argsort(dim=1)[:, : m - n]
            mask[:, j : j + m] = torch.zeros_like(score, dtype=torch.bool).scatter(1, lowest, True)
        err = torch.where(mask[:, j], W[:, j], 0) / Hinv[j, j]
        W[:, j + 1 :] -= torch.outer(err, Hinv[j, j + 1 :])
        W[:, j] = torch.where(mask[:, j], 0, W[:, j])
        Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return W, mask


@pytest.mark.parametrize(
    ("pattern", "blocksize", "dead_column"),
    [(None, 8, None), (None, 12, 5), (None, 128, None), ("2:4", 8, None), ("4:8", 12, 5)],
)
def test_sparsegpt_matches_textbook_obs(pattern, blocksize, dead_column):
    X, W = calibration(), weight()
    if dead_column is not None:
        X[:, dead_column] = 0
    H = hessian(X)
    new, mask = sparsegpt_prune(W, H, 0.5, pattern=pattern, blocksize=blocksize)
    ref, ref_mask = obs_reference(W, H, 0.5, parse_pattern(pattern), blocksize)
    assert torch.equal(mask, ref_mask)
    assert_close_scaled(new.double(), ref, rel=1e-3)  # float32 OBS against a float64 textbook one


def test_sparsegpt_output_contract():
    X, W = calibration(), weight().bfloat16()
    H = hessian(X)
    W_before, H_before = W.clone(), H.clone()
    new, mask = sparsegpt_prune(W, H, 0.5, blocksize=8)
    assert new.dtype == torch.bfloat16 and mask.dtype == torch.bool and mask.shape == W.shape
    assert (new[mask] == 0).all() and (new[~mask] != 0).all()
    assert mask.sum() == ROWS * COLS // 2  # int(0.5 * 16 * 8) in each of the four blocks
    assert torch.equal(W, W_before) and torch.equal(H, H_before)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_beats_magnitude_on_reconstruction(pattern):
    X, W = calibration(), weight()
    new, _ = sparsegpt_prune(W, hessian(X), 0.5, pattern=pattern, blocksize=8)
    n_m = parse_pattern(pattern)
    magnitude = mask_per_matrix(W.abs(), 0.5) if n_m is None else mask_n_m(W.abs(), *n_m)
    pruned = W.masked_fill(magnitude, 0)
    error = lambda Wp: ((W - Wp) @ X.T).pow(2).sum()  # noqa: E731
    assert error(new) < 0.5 * error(pruned)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_zeroes_dead_inputs(pattern):
    X, W = calibration(), weight()
    X[:, [3, 17]] = 0
    new, _ = sparsegpt_prune(W, hessian(X), 0.5, pattern=pattern, blocksize=8)
    assert (new[:, [3, 17]] == 0).all()
    assert (new != 0).sum() >= ROWS * COLS // 2 - 2 * ROWS  # the other inputs are not wiped out


def test_sparsegpt_rejects_indefinite_hessian():
    H = torch.eye(4)
    H[0, 1] = H[1, 0] = 2.0  # eigenvalue -1: no dampening of 1% can fix it
    with pytest.raises(ValueError, match="not positive definite.*percdamp"):
        sparsegpt_prune(torch.randn(2, 4), H, 0.5)
