"""The toy world: determinism, exact boxes, unambiguous language, scoring-ready answers, the CLI.

The questions and expressions are checked against an interpreter written here, independently of
the generator: it reads "the [modifier] [size] [colour] (shape | object)" off the scene file.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmlab.data import DataError, load_class, load_eval, load_image, load_train
from vlmlab.data.toyworld import (
    ANSWER_TYPES,
    CLASS_NAMES,
    COLOURS,
    SHAPES,
    SIZES,
    WORLD_PRESETS,
    WorldConfig,
    data_root,
    generate_world,
    world_vocabulary,
)
from vlmlab.encoders.base import TOY_NUM_CLASSES

ROOT = Path(__file__).resolve().parents[1]
SMOKE = WORLD_PRESETS["smoke"]
PLURAL = {
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "diamonds": "diamond",
    "crosses": "cross",
    "rings": "ring",
}
PAIR = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}
MOST = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate_world(SMOKE, tmp_path_factory.mktemp("w") / "smoke", progress=False)


@pytest.fixture(scope="module")
def scenes(world) -> dict[str, dict]:
    out = {}
    for split in ("pretrain", "train", "test"):
        for line in (world / "scenes" / f"{split}.jsonl").read_text().splitlines():
            s = json.loads(line)
            out[s["image"]] = s
    return out


# ---- an independent reader of the world's language --------------------------------------------------


def center(o: dict) -> tuple[float, float]:
    x1, y1, x2, y2 = o["box"]
    return ((x1 + x2) / 2, (y1 + y2) / 2)


def resolve(expr: str, objects: list[dict]) -> list[dict]:
    """Objects that "the [modifier] [size] [colour] (shape | object)" refers to."""
    words = expr.split()
    assert words[0] == "the", expr
    words = words[1:]
    mod = words.pop(0) if words[0] in (*PAIR, *MOST, "largest", "smallest") else None
    group = objects
    for w in words[:-1]:
        key = "size" if w in SIZES else "colour"
        assert w in SIZES or w in COLOURS, expr
        group = [o for o in group if o[key] == w]
    if words[-1] != "object":
        group = [o for o in group if o["shape"] == words[-1]]
    if mod is None:
        return group
    if mod in ("largest", "smallest"):
        rank = [SIZES.index(o["size"]) for o in group]
        best = max(rank) if mod == "largest" else min(rank)
        return [o for o, r in zip(group, rank, strict=True) if r == best]
    axis, sign = {**PAIR, **MOST}[mod]
    if mod in PAIR:
        assert len(group) == 2, f"{expr!r}: 'left/right/top/bottom' compares exactly two objects"
    else:
        assert len(group) >= 3, f"{expr!r}: '-most' is for three or more"
    best = max(sign * center(o)[axis] for o in group)
    return [o for o in group if sign * center(o)[axis] == best]


def truth(question: str, objects: list[dict]) -> str:
    """The answer to a toy question, read off the scene."""
    q = question.rstrip("?")
    if q.startswith("What color is "):
        (o,) = resolve(q.removeprefix("What color is "), objects)
        return o["colour"]
    if q.startswith("What shape is "):
        (o,) = resolve(q.removeprefix("What shape is "), objects)
        return o["shape"]
    if q.startswith("How many "):
        noun = q.removeprefix("How many ").removesuffix(" are there")
        if noun == "objects":
            return str(len(objects))
        if noun.endswith(" objects"):
            return str(sum(o["colour"] == noun.split()[0] for o in objects))
        return str(sum(o["shape"] == PLURAL[noun] for o in objects))
    if q.startswith("Is there a "):
        colour, shape = q.removeprefix("Is there a ").split()
        return "yes" if any(o["colour"] == colour and o["shape"] == shape for o in objects) else "no"
    assert q.startswith("Is "), question
    for rel, axis, sign in (
        ("to the left of", 0, -1),
        ("to the right of", 0, 1),
        ("above", 1, -1),
        ("below", 1, 1),
    ):
        if f" {rel} " in q:
            a, b = q.removeprefix("Is ").split(f" {rel} ")
            (oa,), (ob,) = resolve(a, objects), resolve(b, objects)
            d = sign * (center(oa)[axis] - center(ob)[axis])
            assert abs(d) >= 2, f"{question!r}: relation too close to call"
            return "yes" if d > 0 else "no"
    raise AssertionError(f"unknown question form {question!r}")


# ---- tests ---------------------------------------------------------------------------------------


def test_same_seed_same_bytes(world, tmp_path):
    again = generate_world(SMOKE, tmp_path / "again", progress=False, workers=2)
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) > SMOKE.n_pretrain + SMOKE.n_train + SMOKE.n_test
    for f in files:
        assert (world / f).read_bytes() == (again / f).read_bytes(), f
    other = generate_world(
        WorldConfig(seed=1, image_size=48, n_pretrain=4, n_train=4, n_test=4), tmp_path / "o", progress=False
    )
    a, b = (world / "images/train/train-000000.png"), (other / "images/train/train-000000.png")
    assert a.read_bytes() != b.read_bytes()


def test_generate_is_idempotent_and_safe(tmp_path):
    cfg = WorldConfig(image_size=32, n_pretrain=5, n_train=3, n_test=2)
    out = generate_world(cfg, tmp_path / "w", progress=False)
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert generate_world(cfg, out, progress=False) == out
    assert (out / "meta.json").stat().st_mtime_ns == stamp  # nothing rewritten
    bigger = WorldConfig(image_size=32, n_pretrain=6, n_train=3, n_test=2)
    with pytest.raises(FileExistsError, match="another config"):
        generate_world(bigger, out, progress=False)
    generate_world(bigger, out, progress=False, overwrite=True)
    assert json.loads((out / "meta.json").read_text())["config"]["n_pretrain"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no temp or old directories left
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a toy world"):
        generate_world(cfg, tmp_path / "x", progress=False, overwrite=True)


def test_layout_counts_and_schema(world):
    meta = json.loads((world / "meta.json").read_text())
    c = meta["counts"]
    assert c["images"] == {"pretrain": SMOKE.n_pretrain, "train": SMOKE.n_train, "test": SMOKE.n_test}
    for split, n in c["images"].items():
        assert len(list((world / "images" / split).glob("*.png"))) == n
    train = load_train(world / "train" / "llava.json")
    vqa, ref = load_eval(world / "eval" / "toy-vqa.jsonl"), load_eval(world / "eval" / "toy-ref.jsonl")
    cls_train, cls_test = (
        load_class(world / "classification/train.jsonl"),
        load_class(world / "classification/test.jsonl"),
    )
    assert len(train) == c["train_records"] and len(vqa) == c["toy-vqa"] and len(ref) == c["toy-ref"]
    assert (
        len(cls_test) == round(0.2 * SMOKE.n_pretrain) and len(cls_train) + len(cls_test) == SMOKE.n_pretrain
    )
    assert {t["task"] for r in train for t in r.metadata["turns"]} == {"vqa", "ref"}
    assert {i.benchmark for i in vqa} == {"toy-vqa"} and {i.benchmark for i in ref} == {"toy-ref"}
    assert {i.split for i in vqa + ref} == {"test"}
    # one multi-turn conversation per train image (LLaVA-665k style), its turns described in metadata
    assert len({r.image for r in train}) == len(train) == SMOKE.n_train
    assert all(len(r.conversations) == 2 * len(r.metadata["turns"]) >= 4 for r in train)
    assert all(r.conversations[0].value.startswith("<image>\n") for r in train)
    assert all("<image>" not in t.value for r in train for t in r.conversations[1:])
    assert {i.metadata["qtype"] for i in vqa} == set(ANSWER_TYPES)


def test_images_nonsquare_and_sizes_match(world, scenes):
    sizes = {tuple(s["image_size"]) for s in scenes.values()}
    assert (48, 48) in sizes and (48, 36) in sizes and (36, 48) in sizes
    frac = sum(s["image_size"][0] != s["image_size"][1] for s in scenes.values()) / len(scenes)
    assert 0.15 < frac < 0.45  # nonsquare_fraction 0.3
    for item in load_eval(world / "eval" / "toy-ref.jsonl")[:20]:
        assert (
            load_image(world, item).size == tuple(item.image_size) == tuple(scenes[item.image]["image_size"])
        )


def test_boxes_are_the_drawn_pixels(world, scenes):
    checked = 0
    for image, s in list(scenes.items())[::3]:
        a = np.asarray(Image.open(world / image).convert("RGB"))
        h, w = a.shape[:2]
        assert [w, h] == s["image_size"]
        for o in s["objects"]:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            on = (a == COLOURS[o["colour"]]).all(-1)
            ys, xs = np.nonzero(on[y1:y2, x1:x2])
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x2 - x1, y2 - y1), (image, o)
            # nothing of that colour in the one-pixel ring around the box
            ring = on[max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1].sum() - on[y1:y2, x1:x2].sum()
            assert ring == 0, (image, o)
            checked += 1
    assert checked > 200


def test_referring_expressions_pick_one_object(world, scenes):
    items = load_eval(world / "eval" / "toy-ref.jsonl")
    per_image: dict[str, list[str]] = {}
    for item in items:
        objs = scenes[item.image]["objects"]
        found = resolve(item.ref, objs)
        assert len(found) == 1, (item.id, item.ref)
        assert found[0]["box"] == item.box
        assert item.metadata["n_objects"] == len(objs)
        per_image.setdefault(item.image, []).append(item.ref)
    assert all(len(set(r)) == len(r) for r in per_image.values())
    assert any(len(r) > 1 for r in per_image.values())
    # the training grounding turns too; their answer is the box in LLaVA's padded-square frame
    pairs = [
        (r, k)
        for r in load_train(world / "train" / "llava.json")
        for k, t in enumerate(r.metadata["turns"])
        if t["task"] == "ref"
    ]
    for r, k in pairs:
        human, gpt = r.conversations[2 * k].value.removeprefix("<image>\n"), r.conversations[2 * k + 1].value
        prefix = 'Please provide the bounding box coordinate of the region this sentence describes: "'
        assert human.startswith(prefix) and human.endswith('"')
        (o,) = resolve(human[len(prefix) : -1], scenes[r.image]["objects"])
        assert o["box"] == r.metadata["turns"][k]["box"]
        assert r.metadata["image_size"] == scenes[r.image]["image_size"]
        w, h = r.metadata["image_size"]
        side = max(w, h)
        px, py = (side - w) // 2, (side - h) // 2  # LLaVA expand2square offsets
        x1, y1, x2, y2 = o["box"]
        want = [(x1 + px) / side, (y1 + py) / side, (x2 + px) / side, (y2 + py) / side]
        assert gpt == "[" + ", ".join(f"{v:.2f}" for v in want) + "]"
        got = json.loads(gpt)
        assert len(got) == 4 and 0 <= got[0] < got[2] <= 1 and 0 <= got[1] < got[3] <= 1


def test_vqa_answers_are_true_with_minority_noise(world, scenes):
    items = load_eval(world / "eval" / "toy-vqa.jsonl")
    noisy = 0
    for item in items:
        assert len(item.answers) == 10
        (top, n), *_ = Counter(item.answers).most_common()
        assert n >= 7, item  # 1-3 noisy answers at most
        assert top == truth(item.question, scenes[item.image]["objects"]), item
        assert top in ANSWER_TYPES[item.metadata["qtype"]]
        noisy += n < 10
    assert 0.1 < noisy / len(items) < 0.5  # answer_noise 0.3
    suffix = "\nAnswer the question using a single word or phrase."
    for r in load_train(world / "train" / "llava.json"):
        for k, t in enumerate(r.metadata["turns"]):
            if t["task"] == "vqa":
                human = r.conversations[2 * k].value.removeprefix("<image>\n")
                gpt = r.conversations[2 * k + 1].value
                assert human.endswith(suffix)
                assert gpt == truth(human[: -len(suffix)], scenes[r.image]["objects"])
                assert gpt in ANSWER_TYPES[t["qtype"]]


def test_classification_labels(world, scenes):
    assert len(CLASS_NAMES) == TOY_NUM_CLASSES == len(SHAPES) * len(COLOURS)
    items = load_class(world / "classification/train.jsonl") + load_class(world / "classification/test.jsonl")
    labels = Counter()
    for item in items:
        objs = scenes[item.image]["objects"]
        ranks = [SIZES.index(o["size"]) for o in objs]
        assert ranks.count(max(ranks)) == 1  # the largest object is unique
        big = objs[ranks.index(max(ranks))]
        assert 0 <= item.label < TOY_NUM_CLASSES
        assert item.label == SHAPES.index(big["shape"]) * 6 + list(COLOURS).index(big["colour"])
        assert item.label_name == f"{big['colour']} {big['shape']}" == CLASS_NAMES[item.label]
        labels[item.label] += 1
    assert len(labels) > 30  # most classes occur even in the smoke world


def test_vocabulary_covers_every_text(world):
    vocab = set(world_vocabulary(world))
    texts = [t.value for r in load_train(world / "train" / "llava.json") for t in r.conversations]
    for item in load_eval(world / "eval" / "toy-vqa.jsonl"):
        texts += [item.question, *item.answers]
    texts += [i.ref for i in load_eval(world / "eval" / "toy-ref.jsonl")]
    import re

    words = {w for t in texts for w in re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]", t.replace("<image>", ""))}
    assert words <= vocab, words - vocab
    assert set('0123456789[],."?') <= vocab and {"yes", "no", *SHAPES, *COLOURS} <= vocab


def test_corrupt_files_are_reported_through_the_loaders(world, tmp_path):
    item = load_eval(world / "eval" / "toy-ref.jsonl")[3]
    png = world / item.image
    (tmp_path / "images" / "test").mkdir(parents=True)
    data = png.read_bytes()
    (tmp_path / item.image).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{item.image}: cannot read image of record '{item.id}'"):
        load_image(tmp_path, item)
    lines = (world / "eval" / "toy-vqa.jsonl").read_text().splitlines()
    rec = json.loads(lines[5])
    rec["answers"] = "yes"
    lines[5] = json.dumps(rec)
    (tmp_path / "toy-vqa.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"toy-vqa\.jsonl: record 5 \(id '{rec['id']}'\): field 'answers'"):
        load_eval(tmp_path / "toy-vqa.jsonl")


def test_cli_and_data_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLMLAB_DATA", str(tmp_path / "d"))
    assert data_root() == tmp_path / "d"
    monkeypatch.delenv("VLMLAB_DATA")
    assert data_root() == Path(__file__).resolve().parents[1] / "data"
    spec = importlib.util.spec_from_file_location("make_toyworld", ROOT / "data_prep" / "make_toyworld.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = [
        "--out",
        str(tmp_path / "w"),
        "--seed",
        "3",
        "--n-pretrain",
        "6",
        "--n-train",
        "4",
        "--n-test",
        "2",
        "--image-size",
        "40",
        "--quiet",
        "--workers",
        "1",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'w'}" in out and "train/llava.json" in out
    meta = json.loads((tmp_path / "w" / "meta.json").read_text())
    assert meta["config"]["seed"] == 3 and meta["config"]["image_size"] == 40
    assert cli.main(args) == 0 and "up to date" in capsys.readouterr().out
    monkeypatch.setenv("VLMLAB_DATA", str(tmp_path / "root"))
    monkeypatch.setattr(
        cli, "WORLD_PRESETS", {"smoke": WorldConfig(image_size=32, n_pretrain=2, n_train=2, n_test=2)}
    )
    assert cli.main(["--preset", "smoke", "--quiet"]) == 0
    assert (tmp_path / "root" / "toyworld" / "smoke" / "meta.json").is_file()
    assert os.path.isdir(tmp_path / "root" / "toyworld" / "smoke" / "images" / "pretrain")


def test_config_checks():
    with pytest.raises(ValueError, match="image_size"):
        WorldConfig(image_size=16)
    with pytest.raises(ValueError, match="max_objects"):
        WorldConfig(max_objects=7)
