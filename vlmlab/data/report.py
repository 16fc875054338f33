"""A dataset report: what a unified-schema root holds, and the image and box geometry it brings.

`report(root)` reads every eval/<benchmark>.jsonl and train/*.json of a root (a toy world or
converted real data) and returns a JSON-able dict:

- per benchmark: items, per split, per question type (metadata["qtype"]), per task (vqa / ref);
- per training file: records, question/answer turns, turns per task and question type;
- images: unique images, and histograms of width, height and aspect ratio (width / height), over
  all images and per benchmark or training file;
- boxes: histograms of box size relative to the image (sqrt of its area fraction, so 0.5 is a box
  a quarter of the image) and of box aspect ratio, from grounding items and training turns.

Histograms use fixed edges (below), so reports of different datasets compare bin by bin; values
outside the edges count in the first or last bin. Image sizes come from the records' image_size
(or metadata image_size), else from the image file's header. `report_figures(rep)` draws them.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from vlmlab.data.schema import load_eval, load_train

# Edges: image sides around the usual encoder inputs (224, 336, 448, 512, 1024, 1333); aspect ratios
# in quarter-octave bins centred on 1 (square: 0.92-1.09; 4:3 in 1.30-1.54; 16:9 in 1.54-1.83),
# from about 1:4 to 4:1; relative box sides in steps of 0.05.
SIDE_EDGES = [0, 64, 128, 224, 256, 336, 448, 512, 640, 800, 1024, 1333, 2048, 4096]
ASPECT_EDGES = [round(2 ** ((k + 0.5) / 4), 4) for k in range(-9, 9)]
BOX_SIDE_EDGES = [round(k / 20, 2) for k in range(21)]


def _hist(values: Iterable[float], edges: list[float]) -> dict[str, list]:
    """Counts of `values` in the bins of `edges` (values past the ends go to the end bins)."""
    v = np.asarray(list(values), dtype=float)
    v = np.clip(v, edges[0], edges[-1])
    counts, _ = np.histogram(v, bins=np.asarray(edges, dtype=float))
    return {"edges": list(edges), "counts": [int(c) for c in counts]}


class _Sizes:
    """Image sizes from records where given, else from the file header (once per image)."""

    def __init__(self, root: Path):
        self.root = root
        self.sizes: dict[str, tuple[int, int] | None] = {}
        self.unreadable: list[str] = []

    def note(self, image: str, size: Any) -> None:
        if isinstance(size, list | tuple) and len(size) == 2 and image not in self.sizes:
            self.sizes[image] = (int(size[0]), int(size[1]))

    def get(self, image: str) -> tuple[int, int] | None:
        if image not in self.sizes:
            try:
                with Image.open(self.root / image) as im:
                    self.sizes[image] = im.size
            except (OSError, SyntaxError, ValueError):
                self.sizes[image] = None
                self.unreadable.append(image)
        return self.sizes[image]


def _image_stats(images: Iterable[str], sizes: _Sizes) -> dict[str, Any]:
    known = [s for s in (sizes.get(i) for i in dict.fromkeys(images)) if s is not None]
    return {
        "n": len(known),
        "width": _hist([w for w, _ in known], SIDE_EDGES),
        "height": _hist([h for _, h in known], SIDE_EDGES),
        "aspect": _hist([w / h for w, h in known], ASPECT_EDGES),
    }


def _box_stats(boxes: list[tuple[list[float], tuple[int, int]]]) -> dict[str, Any]:
    rel_side = [math.sqrt((b[2] - b[0]) * (b[3] - b[1]) / (w * h)) for b, (w, h) in boxes]
    aspect = [(b[2] - b[0]) / (b[3] - b[1]) for b, _ in boxes]
    return {
        "n": len(boxes),
        "rel_side": _hist(rel_side, BOX_SIDE_EDGES),
        "aspect": _hist(aspect, ASPECT_EDGES),
    }


def _sorted_counts(c: Counter) -> dict[str, int]:
    return {str(k): v for k, v in sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0])))}


def report(root: str | os.PathLike) -> dict[str, Any]:
    """Counts, image geometry and box geometry of every eval and train file under `root`."""
    root = Path(root)
    sizes = _Sizes(root)
    rep: dict[str, Any] = {"root": root.name, "eval": {}, "train": {}, "images": {}, "boxes": {}}
    all_images: list[str] = []
    all_boxes: list[tuple[list[float], tuple[int, int]]] = []

    for path in sorted((root / "eval").glob("*.jsonl")):
        items = load_eval(path)
        bench = path.stem
        for it in items:
            sizes.note(it.image, it.image_size)
        boxes = []
        for it in items:
            size = sizes.get(it.image) if it.box is not None else None
            if size is not None:
                boxes.append((it.box, size))
        rep["eval"][bench] = {
            "n": len(items),
            "splits": _sorted_counts(Counter(it.split for it in items)),
            "qtypes": _sorted_counts(Counter(it.metadata.get("qtype", "(none)") for it in items)),
            "tasks": _sorted_counts(Counter(it.task for it in items)),
            "images": len({it.image for it in items}),
        }
        rep["images"][bench] = _image_stats((it.image for it in items), sizes)
        if boxes:
            rep["boxes"][bench] = _box_stats(boxes)
        all_images += [it.image for it in items]
        all_boxes += boxes

    for path in sorted((root / "train").glob("*.json")):
        records = load_train(path)
        name = f"train/{path.stem}"
        tasks: Counter = Counter()
        qtypes: Counter = Counter()
        boxes = []
        for r in records:
            sizes.note(r.image, r.metadata.get("image_size"))
            turns = r.metadata.get("turns") or []
            n_pairs = len(r.conversations) // 2
            for k in range(n_pairs):
                meta = turns[k] if k < len(turns) and isinstance(turns[k], dict) else {}
                tasks[meta.get("task", "(unlabelled)")] += 1
                if "qtype" in meta:
                    qtypes[meta["qtype"]] += 1
                if meta.get("task") == "ref" and meta.get("box") is not None:
                    size = sizes.get(r.image)
                    if size is not None:
                        boxes.append((meta["box"], size))
        rep["train"][name] = {
            "n": len(records),
            "turns": sum(tasks.values()),
            "tasks": _sorted_counts(tasks),
            "qtypes": _sorted_counts(qtypes),
            "images": len({r.image for r in records}),
        }
        rep["images"][name] = _image_stats((r.image for r in records), sizes)
        if boxes:
            rep["boxes"][name] = _box_stats(boxes)
        all_images += [r.image for r in records]
        all_boxes += boxes

    rep["images"]["all"] = _image_stats(all_images, sizes)
    rep["boxes"]["all"] = _box_stats(all_boxes)
    rep["unreadable_images"] = sorted(set(sizes.unreadable))
    return rep


# ---- figures -------------------------------------------------------------------------------------


def _bin_labels(edges: list[float], fmt: str = "{:g}") -> list[str]:
    return [f"{fmt.format(a)}-{fmt.format(b)}" for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _hist_figure(groups: dict[str, dict], title: str, xaxis: str, fmt: str = "{:g}") -> go.Figure:
    fig = go.Figure()
    for name, h in groups.items():
        fig.add_bar(name=name, x=_bin_labels(h["edges"], fmt), y=h["counts"])
    fig.update_layout(
        title=title, barmode="group", xaxis_title=xaxis, yaxis_title="count", template="plotly_white"
    )
    return fig


def report_figures(rep: dict[str, Any]) -> list[go.Figure]:
    """Figures of a `report`: items per benchmark and split, question types, image sizes and aspect
    ratios, box sizes and aspect ratios (sections without data are left out)."""
    figs = []
    root = f" ({rep.get('root', '')})" if rep.get("root") else ""
    if rep["eval"]:
        fig = go.Figure()
        splits = sorted({s for b in rep["eval"].values() for s in b["splits"]})
        for s in splits:
            fig.add_bar(name=s, x=list(rep["eval"]), y=[b["splits"].get(s, 0) for b in rep["eval"].values()])
        fig.update_layout(
            title=f"Items per benchmark and split{root}",
            barmode="stack",
            yaxis_title="items",
            template="plotly_white",
        )
        figs.append(fig)
    qtypes = {
        **{b: v["qtypes"] for b, v in rep["eval"].items()},
        **{t: v["qtypes"] for t, v in rep["train"].items()},
    }
    qtypes = {k: v for k, v in qtypes.items() if v and set(v) != {"(none)"}}
    if qtypes:
        fig = go.Figure()
        for name, counts in qtypes.items():
            top = dict(list(counts.items())[:20])  # VQAv2 has 65 question types: the 20 largest
            fig.add_bar(name=name, x=list(top), y=list(top.values()))
        fig.update_layout(
            title=f"Question types (20 largest per set){root}",
            barmode="group",
            yaxis_title="questions",
            template="plotly_white",
        )
        figs.append(fig)
    per_set = {k: v for k, v in rep["images"].items() if k != "all" and v["n"]}
    if per_set:
        figs.append(
            _hist_figure(
                {k: v["aspect"] for k, v in per_set.items()},
                f"Image aspect ratio (width / height){root}",
                "aspect ratio",
                "{:.2f}",
            )
        )
        long_side = {k: v["width"] for k, v in per_set.items()}
        figs.append(_hist_figure(long_side, f"Image width in pixels{root}", "width (px)"))
        figs.append(
            _hist_figure(
                {k: v["height"] for k, v in per_set.items()}, f"Image height in pixels{root}", "height (px)"
            )
        )
    boxes = {k: v for k, v in rep["boxes"].items() if k != "all" and v["n"]}
    if boxes:
        figs.append(
            _hist_figure(
                {k: v["rel_side"] for k, v in boxes.items()},
                f"Box size relative to the image (sqrt of area fraction){root}",
                "relative side",
            )
        )
        figs.append(
            _hist_figure(
                {k: v["aspect"] for k, v in boxes.items()},
                f"Box aspect ratio (width / height){root}",
                "aspect ratio",
                "{:.2f}",
            )
        )
    return figs
