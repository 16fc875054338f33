"""vlmlab.evaluate.stats: bootstrap intervals, paired tests, and the weighted VQA / Loc / Overall scores."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from vlmlab.evaluate import stats as S
from vlmlab.evaluate.benchmarks import get_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_bootstrap_is_deterministic_per_seed():
    x = np.random.default_rng(3).random(200)
    assert S.bootstrap_ci(x, seed=5) == S.bootstrap_ci(x, seed=5)
    assert S.bootstrap_ci(x, seed=5) != S.bootstrap_ci(x, seed=6)
    point, lo, hi = S.bootstrap_ci(x)
    assert point == np.mean(x) and lo < point < hi


def test_bootstrap_width_matches_the_normal_approximation():
    # 0/1 scores with p = 0.5, n = 400: the 95% interval is about p ± 1.96 sqrt(p(1-p)/n) = ± 0.049.
    x = np.array([0.0, 1.0] * 200)
    point, lo, hi = S.bootstrap_ci(x, n_boot=2000, seed=0)
    half = 1.96 * math.sqrt(0.25 / 400)
    assert point == 0.5
    assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)


def test_bootstrap_of_constant_scores_is_degenerate_and_empty_raises():
    assert tuple(S.bootstrap_ci([0.7] * 50)) == pytest.approx((0.7, 0.7, 0.7))
    assert S.bootstrap_ci([1.0, 0.0, 1.0], stat=np.median, n_boot=50).point == 1.0
    with pytest.raises(ValueError, match="empty"):
        S.bootstrap_ci([])


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    a = rng.random(300)
    # A constant per-item gain leaves no sampling noise in the difference.
    assert tuple(S.paired_bootstrap(a + 0.1, a)) == pytest.approx((0.1, 0.1, 0.1))
    b = rng.random(300)
    diff, lo, hi = S.paired_bootstrap(a, b, seed=2)
    assert diff == pytest.approx(a.mean() - b.mean()) and lo < diff < hi
    assert S.paired_bootstrap(a, b, seed=2) == S.paired_bootstrap(a, b, seed=2)
    with pytest.raises(ValueError, match="same items"):
        S.paired_bootstrap(a, b[:-1])


def test_paired_permutation_test():
    rng = np.random.default_rng(0)
    a = rng.random(100)
    assert S.paired_permutation_test(a, a, n=500) == 1.0  # no difference at all
    # Every flip shrinks |mean| when all items move the same way: only the +1 term remains.
    assert S.paired_permutation_test(a + 1, a, n=999) == pytest.approx(1 / 1000)
    # Three equal differences: exactly 2 of the 8 sign patterns reach |mean| = 1, so p = 1/4.
    p = S.paired_permutation_test([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], n=20000, seed=1)
    assert p == pytest.approx(0.25, abs=0.015)
    assert S.paired_permutation_test(a, a[::-1], n=300, seed=4) == S.paired_permutation_test(
        a, a[::-1], n=300, seed=4
    )


def test_weighted_scores_formula():
    per = {"a": (50.0, 100), "b": (70.0, 300), "c": (20.0, 100)}
    groups = {"a": "vqa", "b": "vqa", "c": "loc"}
    out = S.weighted_scores(per, groups)
    # VQA = (50*100 + 70*300) / 400, Loc = 20, Overall = (26000 + 2000) / 500, w = 100 / 500.
    assert out == pytest.approx(
        {"vqa": 65.0, "loc": 20.0, "overall": 56.0, "n_vqa": 400, "n_loc": 100, "loc_share": 0.2}
    )
    w = out["loc_share"]
    assert out["overall"] == pytest.approx((1 - w) * out["vqa"] + w * out["loc"])
    assert S.weighted_scores({"a": (50.0, 10)}, groups)["loc"] is None
    with pytest.raises(KeyError, match="no group"):
        S.weighted_scores({"zzz": (1.0, 1)}, groups)


# ----------------------------------------------------------------------------------------------
# The released rows: Overall ≈ 0.866·VQA + 0.134·Loc (FACTS.md), and what the slim sizes give
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper(oracles) -> Path:
    """The study facts folder beside the oracles (../shared/paper)."""
    return oracles.parent / "paper"


@pytest.fixture(scope="module")
def released_rows(paper) -> list[dict]:
    path = paper / "released_results.csv"
    if not path.is_file():
        pytest.skip(f"released results not found at {path}")
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def facts_weights(paper) -> tuple[float, float]:
    path = paper / "FACTS.md"
    if not path.is_file():
        pytest.skip(f"FACTS.md not found at {path}")
    m = re.search(r"Overall ≈ ([0-9.]+)·VQA \+ ([0-9.]+)·Loc", path.read_text())
    assert m, "FACTS.md no longer states the Overall formula"
    return float(m.group(1)), float(m.group(2))


def test_overall_formula_holds_on_released_rows(released_rows, facts_weights):
    w_vqa, w_loc = facts_weights
    assert w_vqa + w_loc == pytest.approx(1.0)
    assert len(released_rows) == 8
    lo, hi = S.implied_loc_share(released_rows)
    # One w fits all 8 rows up to their 2-decimal rounding, and FACTS' 0.134 is that w to 3 decimals.
    assert lo <= hi and round(lo, 3) == round(hi, 3) == w_loc
    assert max(abs(r) for r in S.overall_residuals(released_rows, (lo + hi) / 2)) <= 0.01 + 1e-9
    assert max(abs(r) for r in S.overall_residuals(released_rows, w_loc)) < 0.02


def _paper_benchmarks() -> list[str]:
    cfg = yaml.safe_load((ROOT / "vlmlab" / "presets" / "paper-224.yaml").read_text())
    return cfg["eval"]["benchmarks"]


def test_slim_sizes_do_not_reproduce_the_loc_share(released_rows):
    lo, hi = S.implied_loc_share(released_rows)
    names = _paper_benchmarks()
    groups = {n: get_benchmark(n).group for n in names}
    slim = {n: get_benchmark(n).slim_total for n in names}
    share = S.loc_share(slim, groups)
    assert share == pytest.approx(6144 / (6144 + 12486))
    assert not lo <= share <= hi  # reported in stats.search_loc_share's docstring
    # Full sets (builder facts; RefCOCO* val has 26488 sentences over its three datasets).
    full = {"vqa": 214354 + 12578 + 4319 + 5000 + 8910 + 38589 + 1222 + 15501, "loc": 26488 + 18342}
    assert not lo <= full["loc"] / (full["loc"] + full["vqa"]) <= hi


def test_search_loc_share_finds_only_ad_hoc_mixtures(released_rows):
    lo, hi = S.implied_loc_share(released_rows)
    options = {
        "vqa-v2": [0, 1024, 214354], "gqa": [0, 1024, 12578], "vizwiz": [0, 1024, 4319],
        "textvqa": [0, 1024, 5000], "pope": [0, 3072, 8910], "tally-qa": [0, 2048, 38589],
        "vsr": [0, 1222], "ai2d": [0, 2048, 15501],
        "refcoco-all": [0, 3072, 26488], "ocid-ref": [0, 3072, 18342],
    }  # fmt: skip
    groups = {n: ("loc" if n in ("refcoco-all", "ocid-ref") else "vqa") for n in options}
    found = S.search_loc_share(options, groups, lo, hi)
    assert found and all(lo <= S.loc_share(f, groups) <= hi for f in found)
    assert {"pope": 3072, "vsr": 1222, "ai2d": 15501, "refcoco-all": 3072} in found
    all_slim = {n: v[1] for n, v in options.items()}
    all_full = {n: v[-1] for n, v in options.items()}
    assert all_slim not in found and all_full not in found
    # The one match that evaluates every benchmark: full sets, except GQA at its slim size.
    complete = [f for f in found if len(f) == len(options)]
    assert complete == [{**all_full, "gqa": 1024}]


def test_spearman_ranks_with_ties_and_refuses_unpaired_input():
    assert S.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert S.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert S.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
    # ties take their mean rank: x ranks [0, 1.5, 1.5, 3] against y ranks [0, 1, 2, 3]
    assert S.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(
        np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
    )
    assert math.isnan(S.spearman([1, 2], [1, 2]))  # too few pairs
    assert math.isnan(S.spearman([1, 1, 1], [1, 2, 3]))  # a constant side has no ranking
    with pytest.raises(ValueError, match="pairs"):
        S.spearman([1, 2, 3], [1, 2])


def test_spearman_test_exact_and_monte_carlo_p_values_and_a_bootstrap_interval():
    # n = 5, a perfect ranking: exactly 2 of the 120 orders reach |rho| = 1
    t = S.spearman_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert t.rho == pytest.approx(1.0) and t.n == 5
    assert t.p == pytest.approx(2 / 120)
    assert t.lo <= t.rho <= t.hi == pytest.approx(1.0)
    # n = 10 goes to random orders: close to the exact 2 / 10! floor, never 0
    t10 = S.spearman_test(range(10), range(10), n_perm=2000)
    assert 0 < t10.p <= 3 / 2001
    # no association: a large p, and an interval that straddles 0
    x = [0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4]
    y = [0.5, 0.2, 0.6, 0.9, 0.1, 0.3, 0.4, 0.8]
    t0 = S.spearman_test(x, y)
    assert t0.rho == pytest.approx(S.spearman(x, y))
    assert t0.p > 0.2 and t0.lo < 0 < t0.hi
    assert S.spearman_test(x, y) == t0  # the same seed, the same interval
    assert math.isnan(S.spearman_test([1, 1, 1], [1, 2, 3]).p)
    with pytest.raises(ValueError, match="pairs"):
        S.spearman_test([1, 2, 3], [1, 2])
