"""The released results quoted in vlmlab.paper equal the facts file of the study."""

import csv

import pytest

from tests.conftest import ORACLES
from vlmlab.paper import RELEASED_RESULTS

CSV = ORACLES.parent / "paper" / "released_results.csv"


def test_released_results_match_the_facts_file():
    if not CSV.is_file():
        pytest.skip(f"paper facts not found at {CSV}")
    rows = {r["public_id"]: r for r in csv.DictReader(CSV.open())}
    assert {r["id"] for r in RELEASED_RESULTS} == set(rows)
    for r in RELEASED_RESULTS:
        f = rows[r["id"]]
        assert (r["vqa"], r["loc"], r["overall"]) == (
            float(f["weighted_vqa"]),
            float(f["weighted_loc"]),
            float(f["weighted_overall"]),
        ), r["id"]
        assert r["params_M"] == int(f["params"].rstrip("M")) and r["tokens"] == int(f["vision_tokens"])
