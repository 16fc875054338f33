"""Token statistics of vlmlab.analysis.probes: effective rank and high-norm outlier tokens."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmlab.analysis import probes

# ----------------------------------------------------------------------------------------------
# effective rank (Roy & Vetterli, 2007)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,rank", [((5, 5), 5), ((8, 3), 3), ((3, 8), 3), ((10, 6), 4)])
def test_effective_rank_of_identity_like_is_rank(shape, rank, dtype):
    """Equal non-zero singular values: erank is exactly the rank."""
    m = torch.zeros(shape, dtype=dtype)
    m[range(rank), range(rank)] = 1.0
    assert probes.effective_rank(m) == pytest.approx(rank, abs=1e-9)
    # a rotated copy has the same singular values
    q, _ = torch.linalg.qr(
        torch.randn(shape[0], shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    assert probes.effective_rank(q.to(dtype) @ m) == pytest.approx(rank, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_effective_rank_of_rank_one_is_one(dtype):
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(50, 1, generator=g, dtype=dtype), torch.randn(1, 16, generator=g, dtype=dtype)
    assert probes.effective_rank(u @ v) == pytest.approx(1.0, abs=1e-9)


def test_effective_rank_zero_matrix_and_centering():
    assert probes.effective_rank(torch.zeros(4, 3)) == 0.0
    # every row the same: rank 1 uncentred, nothing left once the mean row is removed
    rows = torch.ones(6, 1) @ torch.randn(1, 5, generator=torch.Generator().manual_seed(2))
    assert probes.effective_rank(rows) == pytest.approx(1.0)
    assert probes.effective_rank(rows, center=True) == 0.0


def test_effective_rank_pools_tokens_and_per_image_matches_loop():
    tokens = torch.randn(7, 9, 5, generator=torch.Generator().manual_seed(3))
    assert probes.effective_rank(tokens) == pytest.approx(probes.effective_rank(tokens.reshape(63, 5)))
    per_image = probes.effective_rank_per_image(tokens, center=True)
    assert per_image.shape == (7,)
    loop = [probes.effective_rank(t, center=True) for t in tokens]
    torch.testing.assert_close(per_image, torch.tensor(loop, dtype=per_image.dtype))


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 12),
    d=st.integers(1, 12),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
    center=st.booleans(),
)
def test_effective_rank_scale_invariant_and_bounded(m, d, scale, seed, center):
    x = torch.randn(m, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    er = probes.effective_rank(x, center=center)
    assert probes.effective_rank(scale * x, center=center) == pytest.approx(er, rel=1e-9, abs=1e-12)
    rank = int(torch.linalg.matrix_rank(x - x.mean(0) if center else x))
    assert (er == 0.0) if rank == 0 else (1.0 - 1e-9 <= er <= rank + 1e-9)


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 8), d=st.integers(8, 20), seed=st.integers(0, 2**16))
def test_effective_rank_of_orthogonal_equal_norm_rows_is_their_count(k, d, seed):
    """Any k orthogonal rows of equal norm (k <= d): erank = k, whatever the rotation."""
    q, _ = torch.linalg.qr(
        torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    )
    assert probes.effective_rank(3.0 * q[:k]) == pytest.approx(k, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# token norms and high-norm outliers


def _gaussian_tokens(n, t, d, seed):
    return torch.randn(n, t, d, generator=torch.Generator().manual_seed(seed))


def test_outliers_found_exactly_where_planted():
    tokens = _gaussian_tokens(40, 16, 32, seed=0)
    g = torch.Generator().manual_seed(1)
    planted = torch.zeros(40, 16, dtype=torch.bool)
    for i in range(0, 40, 2):  # every other image gets 1-3 outliers
        planted[i, torch.randperm(16, generator=g)[: 1 + i % 3]] = True
    tokens[planted] *= 10.0
    rel = probes.token_norms(tokens)
    assert torch.equal(rel > 3.0, planted)
    stats = probes.token_norm_stats(tokens, grid=(4, 4))
    assert stats["outlier_share"] == pytest.approx(planted.float().mean().item())
    assert stats["outlier_image_share"] == pytest.approx(0.5)
    assert stats["outliers_per_image"] == pytest.approx(planted.sum().item() / 40)
    border = probes.border_mask((4, 4))
    assert stats["outlier_border_share"] == pytest.approx(
        planted[:, border].sum().item() / planted.sum().item()
    )
    assert stats["border_share_chance"] == pytest.approx(12 / 16)


def test_outlier_position_summary():
    """All outliers in the top-left corner: border share 1, mean position (0, 0)."""
    tokens = _gaussian_tokens(10, 25, 16, seed=4)
    tokens[:, 0] *= 20.0
    stats = probes.token_norm_stats(tokens)
    assert stats["outlier_share"] == pytest.approx(1 / 25)
    assert stats["outlier_border_share"] == 1.0
    assert (stats["outlier_mean_row"], stats["outlier_mean_col"]) == (0.0, 0.0)
    # the centre token of a 5x5 grid: off the border, mean position (0.5, 0.5)
    tokens = _gaussian_tokens(10, 25, 16, seed=4)
    tokens[:, 12] *= 20.0
    stats = probes.token_norm_stats(tokens, grid=(5, 5))
    assert stats["outlier_border_share"] == 0.0
    assert (stats["outlier_mean_row"], stats["outlier_mean_col"]) == (0.5, 0.5)


def test_no_outliers_in_gaussian_tokens_at_default_threshold():
    tokens = _gaussian_tokens(500, 64, 32, seed=5)
    stats = probes.token_norm_stats(tokens)
    assert stats["outlier_share"] == 0.0 and stats["outlier_image_share"] == 0.0
    assert math.isnan(stats["outlier_border_share"]) and math.isnan(stats["outlier_mean_row"])
    assert 1.0 < stats["max_over_median"] < 3.0


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 20),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    d=st.integers(8, 64),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_gaussian_tokens_have_no_outliers_and_stats_are_scale_free(n, h, w, d, scale, seed):
    tokens = _gaussian_tokens(n, h * w, d, seed)
    a, b = probes.token_norm_stats(tokens, grid=(h, w)), probes.token_norm_stats(scale * tokens, grid=(h, w))
    assert a["outlier_share"] == 0.0
    for key in ["p99_over_median", "max_over_median", "outlier_share", "border_share_chance"]:
        assert b[key] == pytest.approx(a[key], rel=1e-4)
    assert b["mean_norm"] == pytest.approx(scale * a["mean_norm"], rel=1e-4)


def test_token_norm_stats_checks_the_grid():
    with pytest.raises(ValueError, match="square"):
        probes.token_norm_stats(torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="cells"):
        probes.token_norm_stats(torch.randn(2, 6, 4), grid=(2, 2))
    assert probes.token_norm_stats(torch.randn(2, 6, 8), grid=(2, 3))["border_share_chance"] == 1.0


def test_border_mask():
    m = probes.border_mask((3, 4)).reshape(3, 4)
    assert m[1, 1:3].tolist() == [False, False] and m.sum() == 10
    assert probes.border_mask((1, 1)).tolist() == [True]


def test_norm_histogram_shares_sum_to_one_with_overflow_in_last_bin():
    tokens = _gaussian_tokens(20, 9, 16, seed=6)
    tokens[:, 4] *= 50.0  # far past the last edge
    shares = probes.norm_histogram(tokens, torch.linspace(0, 6, 13))
    assert shares.sum().item() == pytest.approx(1.0)
    assert shares[-1].item() == pytest.approx(1 / 9)
