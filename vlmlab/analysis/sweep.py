"""Reading a suite's grid back: per-item scores of every cell, and paired effects of one factor.

A *factor* is one grid coordinate of `vlmlab.run.Cell` (init, connector, policy, encoder). Its effect
"b instead of a" is measured on pairs of cells that differ in that factor alone (same encoder, other
factors and seed), scored on the same test items:

* per pair: the mean per-item difference (b - a), with a paired bootstrap CI over items and a paired
  permutation p-value (`vlmlab.evaluate.stats`);
* over pairs: the mean of the per-pair differences with a bootstrap CI over pairs, so the
  interval covers seed and encoder variation too, plus how many pairs moved up.

Notebooks 05 and 06 use these; the numbers are whatever the sweep gives (toy world for toy presets).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from vlmlab.evaluate import stats
from vlmlab.evaluate.harness import read_results

BENCHMARKS = ("toy-vqa", "toy-ref")


def load_items(dirs: Mapping, benchmarks: Iterable[str] = BENCHMARKS) -> dict:
    """Cell -> benchmark -> {item id: score} for every finished cell (`dirs`: Cell -> run dir, as
    `vlmlab.run.run_dirs` gives)."""
    out = {}
    for cell, d in dirs.items():
        if (Path(d) / "summary.json").is_file():
            out[cell] = {
                b: {r["id"]: float(r["score"]) for r in read_results(Path(d) / "results" / f"{b}.jsonl")}
                for b in benchmarks
            }
    return out


def _aligned(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("the two cells share no scored items")
    return np.array([a[i] for i in ids]), np.array([b[i] for i in ids])


def pairs(items: Mapping, factor: str, a, b) -> list[tuple]:
    """(cell with factor=a, cell with factor=b) for every cell pair differing only in `factor`."""
    by_rest = {}
    for cell in items:
        rest = cell._replace(**{factor: None})
        by_rest.setdefault(rest, {})[getattr(cell, factor)] = cell
    return [(v[a], v[b]) for v in by_rest.values() if a in v and b in v]


def paired_effect(
    items: Mapping, factor: str, a, b, bench: str = "toy-ref", n_boot: int = 1000, n_perm: int = 2000
) -> dict:
    """Effect of `factor` = b instead of a on `bench` (score differences b - a), per pair and overall."""
    rows = []
    for ca, cb in pairs(items, factor, a, b):
        xa, xb = _aligned(items[ca][bench], items[cb][bench])
        ci = stats.paired_bootstrap(xb, xa, n_boot=n_boot)
        rows.append(
            {
                "pair": f"{ca.label()} s{ca.seed}",  # the a-cell; its partner differs in `factor` only
                "encoder": ca.encoder,
                "a": float(xa.mean()),
                "b": float(xb.mean()),
                "delta": ci.point,
                "lo": ci.lo,
                "hi": ci.hi,
                "p": stats.paired_permutation_test(xb, xa, n=n_perm),
                "n_items": int(xa.size),
            }
        )
    out = {"factor": factor, "a": a, "b": b, "bench": bench, "n_pairs": len(rows), "pairs": rows}
    if rows:
        deltas = np.array([r["delta"] for r in rows])
        ci = stats.bootstrap_ci(deltas, n_boot=n_boot) if len(rows) > 1 else None
        out.update(
            delta=float(deltas.mean()),
            lo=ci.lo if ci else float("nan"),
            hi=ci.hi if ci else float("nan"),
            n_up=int((deltas > 0).sum()),
            n_down=int((deltas < 0).sum()),
            n_significant=int(sum(r["p"] < 0.05 for r in rows)),
        )
    return out


def effect_row(effect: dict, name: str | None = None) -> dict:
    """One summary line of a `paired_effect` result (for tables and forest plots)."""
    return {
        "effect": name or f"{effect['factor']}: {effect['a']} → {effect['b']}",
        "bench": effect["bench"],
        "pairs": effect["n_pairs"],
        "delta": effect.get("delta", float("nan")),
        "lo": effect.get("lo", float("nan")),
        "hi": effect.get("hi", float("nan")),
        "up": effect.get("n_up", 0),
        "down": effect.get("n_down", 0),
        "p<0.05 pairs": effect.get("n_significant", 0),
    }


def constant_box_reference(gt_boxes: np.ndarray, thr: float = 0.05) -> dict:
    """Collapse signals of two reference predictors on the same items, for placing thresholds:
    the ground truth itself (no collapse: full spread) and the mean box for every item (total collapse)."""
    gt = np.asarray(gt_boxes, dtype=float).reshape(-1, 4)
    med = np.median(gt, axis=0)
    return {
        "gt_near_constant_share": float((np.abs(gt - med).max(1) <= thr).mean()),
        "gt_std_ratio": 1.0,
        "mean_box_near_constant_share": 1.0,
        "mean_box_std_ratio": 0.0,
    }


GRID_KEYS = ("encoder", "init", "connector", "policy", "seed")


def grid_agreement(
    a_rows: Iterable[Mapping],
    b_rows: Iterable[Mapping],
    metrics: Iterable[str],
    seeds: Iterable | None = None,
) -> tuple[list[dict], dict]:
    """How well a second run of a grid (e.g. with its own encoder pretraining) reproduces the first.

    Rows are sweep.csv rows. Only cells finished in both grids count (and, given `seeds`, only those
    seeds, so that both sides average over the same cells). Returns one row per encoder (each metric's
    mean over its shared cells in a and in b) and a summary: the number of shared cells, and per metric
    the Spearman correlation over cells and over the encoders' means (does the encoder ranking
    replicate?), with both grids' overall means.
    """
    keep = None if seeds is None else {str(s) for s in seeds}
    index = [{tuple(str(r[k]) for k in GRID_KEYS): r for r in rows} for rows in (a_rows, b_rows)]
    shared = sorted(k for k in index[0].keys() & index[1].keys() if keep is None or k[4] in keep)
    if not shared:
        raise ValueError("the two grids share no finished cell")
    metrics = list(metrics)
    encoders = list(dict.fromkeys(k[0] for k in shared))
    per_encoder, summary = [], {"shared_cells": len(shared), "encoders": len(encoders)}
    for e in encoders:
        row = {"encoder": e, "cells": sum(k[0] == e for k in shared)}
        for m in metrics:
            for side, idx in (("a", index[0]), ("b", index[1])):
                row[f"{m}_{side}"] = float(np.mean([float(idx[k][m]) for k in shared if k[0] == e]))
        per_encoder.append(row)
    for m in metrics:
        a = [float(index[0][k][m]) for k in shared]
        b = [float(index[1][k][m]) for k in shared]
        summary[m] = {
            "mean_a": float(np.mean(a)),
            "mean_b": float(np.mean(b)),
            "spearman_cells": stats.spearman(a, b),
            "spearman_encoder_means": stats.spearman(
                [r[f"{m}_a"] for r in per_encoder], [r[f"{m}_b"] for r in per_encoder]
            ),
        }
    return per_encoder, summary


def _read_csv(path: str | Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [k for k in GRID_KEYS if rows and k not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: not a sweep table (no rows, or missing columns {missing})")
    return rows


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    from vlmlab.io import atomic_write_json
    from vlmlab.plots import write_csv

    ap = argparse.ArgumentParser(
        description="Compare two sweep tables cell by cell: does the second grid reproduce the first?"
    )
    ap.add_argument("a", help="sweep.csv of the first grid")
    ap.add_argument("b", help="sweep.csv of the second grid")
    ap.add_argument("--metrics", nargs="+", default=["vqa_accuracy", "grounding_acc50"])
    ap.add_argument("--seeds", nargs="*", default=None, help="only these seeds (default: every shared cell)")
    ap.add_argument("--out", default=None, help="write <out>.csv (per encoder) and <out>.json (summary)")
    a = ap.parse_args(argv)
    per_encoder, summary = grid_agreement(_read_csv(a.a), _read_csv(a.b), a.metrics, a.seeds)
    summary.update({"a": a.a, "b": a.b, "seeds": a.seeds})
    print(json.dumps(summary, indent=1))
    if a.out:
        write_csv(per_encoder, f"{a.out}.csv")
        atomic_write_json(f"{a.out}.json", summary)
        print(f"wrote {a.out}.csv and {a.out}.json")


if __name__ == "__main__":
    main()
