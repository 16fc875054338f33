"""Localization instability: how spread are grounding scores over seeds, and which runs collapse?

"Localization collapse" (the paper's term): a VLM whose box answers stop depending on the image —
predictions concentrate near one box (often the data's mean box), their variance drops, or many
answers do not parse. These functions read the per-item grounding results of a run.
"""

from __future__ import annotations

import numpy as np


def predicted_boxes(rows: list[dict]) -> np.ndarray:
    return np.array([r["parsed"] for r in rows if r.get("parsed") is not None], dtype=float).reshape(-1, 4)


def near_constant_share(rows: list[dict], thr: float = 0.05) -> float:
    """Share of all predictions within `thr` (every coordinate) of the median predicted box."""
    boxes = predicted_boxes(rows)
    if len(boxes) == 0:
        return 0.0
    med = np.median(boxes, axis=0)
    return float((np.abs(boxes - med).max(1) <= thr).sum() / max(len(rows), 1))


def collapse_signals(rows: list[dict], thr: float = 0.05) -> dict:
    boxes = predicted_boxes(rows)
    invalid = sum(1 for r in rows if str(r.get("status", "")).startswith("invalid")) / max(len(rows), 1)
    gt = np.array([r["gt_box"] for r in rows], dtype=float).reshape(-1, 4)
    return {
        "acc50": float(np.mean([r["score"] for r in rows])) if rows else float("nan"),
        "near_constant_share": near_constant_share(rows, thr),
        "pred_box_std": float(boxes.std(0).mean()) if len(boxes) > 1 else 0.0,
        "gt_box_std": float(gt.std(0).mean()) if len(gt) > 1 else 0.0,
        "invalid_rate": invalid,
    }


def is_collapsed(
    signals: dict, share_thr: float = 0.5, std_ratio_thr: float = 0.25, invalid_thr: float = 0.5
) -> bool:
    """A run collapses when most boxes sit on one box, or their spread is far below the truth's,
    or most answers are invalid. Thresholds are arguments so notebook 05 can justify them on data."""
    low_spread = signals["pred_box_std"] < std_ratio_thr * max(signals["gt_box_std"], 1e-9)
    return bool(
        signals["near_constant_share"] >= share_thr or low_spread or signals["invalid_rate"] >= invalid_thr
    )


def seed_spread(acc_by_seed: dict[str, list[float]]) -> list[dict]:
    """Per encoder: mean, std, min, max, range of Acc@0.5 over seeds."""
    out = []
    for enc, vals in acc_by_seed.items():
        v = np.asarray(vals, dtype=float)
        out.append(
            {
                "encoder": enc,
                "mean": float(v.mean()),
                "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "min": float(v.min()),
                "max": float(v.max()),
                "range": float(v.max() - v.min()),
                "n": len(v),
            }
        )
    return out
