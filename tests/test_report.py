"""Dataset report: counts per benchmark / split / question type, image and box geometry, figures."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from vlmlab.data import convert as C
from vlmlab.data.report import ASPECT_EDGES, BOX_SIDE_EDGES, report, report_figures
from vlmlab.data.toyworld import QTYPES, WORLD_PRESETS, generate_world, read_meta

FIX = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate_world(WORLD_PRESETS["smoke"], tmp_path_factory.mktemp("w") / "smoke", progress=False)


@pytest.fixture(scope="module")
def rep(world) -> dict:
    return report(world)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _bin(edges: list[float], value: float) -> int:
    return next(i for i in range(len(edges) - 1) if edges[i] <= value < edges[i + 1])


def test_counts_match_the_world(world, rep):
    counts = read_meta(world)["counts"]  # written by the generator, not by the report
    for bench in ("toy-vqa", "toy-ref"):
        b = rep["eval"][bench]
        assert b["n"] == counts[bench] and b["splits"] == {"test": counts[bench]}
        assert sum(b["qtypes"].values()) == b["n"]
    assert set(rep["eval"]["toy-vqa"]["qtypes"]) <= set(QTYPES)
    assert rep["eval"]["toy-vqa"]["tasks"] == {"vqa": counts["toy-vqa"]}
    assert rep["eval"]["toy-ref"]["tasks"] == {"ref": counts["toy-ref"]}
    train = rep["train"]["train/llava"]
    assert train["n"] == counts["train_records"] and train["images"] == counts["images"]["train"]
    assert train["tasks"] == {"vqa": counts["train_vqa"], "ref": counts["train_ref"]}
    assert train["turns"] == counts["train_vqa"] + counts["train_ref"]
    json.dumps(rep)  # plain JSON


def test_image_geometry(world, rep):
    sizes = {s["image"]: tuple(s["image_size"]) for s in _jsonl(world / "scenes" / "test.jsonl")}
    used = {it["image"] for it in _jsonl(world / "eval" / "toy-vqa.jsonl")}
    shapes = Counter("square" if w == h else "4:3" if w > h else "3:4" for w, h in (sizes[i] for i in used))
    assert shapes["4:3"] and shapes["3:4"] and shapes["square"]  # the smoke world has all three
    stats = rep["images"]["toy-vqa"]
    assert stats["n"] == len(used)
    aspect = stats["aspect"]["counts"]
    assert aspect[_bin(ASPECT_EDGES, 1.0)] == shapes["square"]
    assert aspect[_bin(ASPECT_EDGES, 4 / 3)] == shapes["4:3"]
    assert aspect[_bin(ASPECT_EDGES, 3 / 4)] == shapes["3:4"]
    assert sum(aspect) == len(used)
    assert sum(stats["width"]["counts"]) == sum(stats["height"]["counts"]) == len(used)
    # every toy image is 48 pixels on its long side: all in the first side bin (0-64)
    assert stats["width"]["counts"][0] == len(used)


def test_box_geometry(world, rep):
    counts = read_meta(world)["counts"]
    boxes = rep["boxes"]["toy-ref"]
    assert boxes["n"] == counts["toy-ref"] == sum(boxes["rel_side"]["counts"])
    assert rep["boxes"]["train/llava"]["n"] == counts["train_ref"]
    assert rep["boxes"]["all"]["n"] == counts["toy-ref"] + counts["train_ref"]
    # toy objects are drawn in squares of 0.16-0.34 of the long side: their tight boxes are never
    # more than 0.45 of the image (sqrt of the area fraction) and never under 0.05
    side = boxes["rel_side"]["counts"]
    assert sum(side[: _bin(BOX_SIDE_EDGES, 0.05)]) == 0
    assert sum(side[_bin(BOX_SIDE_EDGES, 0.45) :]) == 0


def test_figures(rep):
    figs = report_figures(rep)
    titles = [f.layout.title.text for f in figs]
    assert len(figs) == 7 and all("smoke" in t for t in titles)
    total_items = sum(b["n"] for b in rep["eval"].values())
    assert sum(sum(t.y) for t in figs[0].data) == total_items  # items per benchmark, stacked by split
    qtypes = {t.name: dict(zip(t.x, t.y, strict=True)) for t in figs[1].data}
    assert qtypes["toy-vqa"] == rep["eval"]["toy-vqa"]["qtypes"]
    box_side = next(f for f in figs if f.layout.title.text.startswith("Box size"))
    assert {t.name for t in box_side.data} == {"toy-ref", "train/llava"}


def test_report_of_converted_real_data(tmp_path):
    out = tmp_path / "real"
    C.write_conversion(C.convert_refcoco(FIX / "refcoco", FIX / "refcoco/train2014"), out)
    # without image_size in the records, the report reads the image headers
    store = C.ImageStore(FIX / "vqav2/val2014", "images/vqav2", check="exists")
    vqa = C.convert_vqav2(
        FIX / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
        FIX / "vqav2/v2_mscoco_val2014_annotations.json",
        store,
    )
    assert all(it.image_size is None for it in vqa.records)
    C.write_conversion(vqa, out)
    r = report(out)
    assert {b: v["n"] for b, v in r["eval"].items()} == {
        "refcoco": 3,
        "refcoco+": 1,
        "refcocog": 3,
        "vqa-v2": 3,
    }
    assert r["eval"]["vqa-v2"]["qtypes"] == {"how many": 1, "is the man": 1, "what color is the": 1}
    assert r["images"]["vqa-v2"]["n"] == 2 and not r["unreadable_images"]
    aspect = r["images"]["vqa-v2"]["aspect"]["counts"]  # the fixture images are 8x6 and 6x8
    assert aspect[_bin(ASPECT_EDGES, 8 / 6)] == 1 and aspect[_bin(ASPECT_EDGES, 6 / 8)] == 1
    assert r["boxes"]["all"]["n"] == 7 and "vqa-v2" not in r["boxes"]
    assert len(report_figures(r)) == 7


def test_empty_root(tmp_path):
    r = report(tmp_path)
    assert r["eval"] == {} and r["train"] == {} and r["boxes"]["all"]["n"] == 0
    assert report_figures(r) == []
