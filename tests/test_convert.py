"""Converters of the paper's real data: official formats -> unified schema, the harness's order and
slim subsets, bad input, writers, downloads and the command line.

tests/fixtures/<dataset>/ holds 2-7 hand-made records per dataset in exactly the official file
structure, with images of a few pixels; bad-input tests mutate a copy of them.
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path
from random import Random

import pytest
from PIL import Image

from vlmlab.data import DataError, EvalItem, load_eval, load_image, load_train
from vlmlab.data import convert as C
from vlmlab.evaluate.benchmarks import SHORT_ANSWER, build_prompt

FIX = Path(__file__).resolve().parent / "fixtures"

# Each converter on a fixture folder laid out as the official downloads are (`images` overrides the
# image folder, e.g. with an ImageStore).
CONVERT = {
    "vqav2": lambda d, images=None, **kw: C.convert_vqav2(
        d / "v2_OpenEnded_mscoco_val2014_questions.json",
        d / "v2_mscoco_val2014_annotations.json",
        images or d / "val2014",
        **kw,
    ),
    "gqa": lambda d, images=None, **kw: C.convert_gqa(
        d / "testdev_balanced_questions.json", images or d / "images", **kw
    ),
    "vizwiz": lambda d, images=None, **kw: C.convert_vizwiz(d / "val.json", images or d / "val", **kw),
    "textvqa": lambda d, images=None, **kw: C.convert_textvqa(
        d / "TextVQA_0.5.1_val.json", images or d / "train_images", d / "textvqa_val_v051_ocr.jsonl", **kw
    ),
    "pope": lambda d, images=None, **kw: C.convert_pope(
        *(d / f"coco_pope_{s}.json" for s in C.POPE_SPLITS), images or d / "val2014", **kw
    ),
    "vsr": lambda d, images=None, **kw: C.convert_vsr(d / "test.jsonl", images or d / "images", **kw),
    "tallyqa": lambda d, images=None, **kw: C.convert_tallyqa(d / "test.json", images or d / "images", **kw),
    "ai2d": lambda d, images=None, **kw: C.convert_ai2d(
        d / "ai2d/questions", d / "ai2d_test_ids.csv", images or d / "ai2d/images", **kw
    ),
    "refcoco": lambda d, images=None, **kw: C.convert_refcoco(d, images or d / "train2014", **kw),
    "ocidref": lambda d, images=None, **kw: C.convert_ocidref(
        d / "val_expressions.json", images or d / "OCID-dataset", **kw
    ),
    "llava": lambda d, images=None, **kw: C.convert_llava(
        d / "llava_v1_5_mix665k.json", images or d / "images", **kw
    ),
}
# What the hand-made fixture files hold (items per benchmark; input records).
EXPECTED = {
    "vqav2": ({"vqa-v2": 3}, 3),
    "gqa": ({"gqa": 3}, 3),
    "vizwiz": ({"vizwiz": 3}, 3),
    "textvqa": ({"textvqa-ocr": 3}, 3),
    "pope": ({"pope": 7}, 7),
    "vsr": ({"vsr": 3}, 3),
    "tallyqa": ({"tally-qa": 3}, 3),
    "ai2d": ({"ai2d": 3}, 3),
    "refcoco": ({"refcoco": 3, "refcoco+": 1, "refcocog": 3}, 7),  # val sentences only
    "ocidref": ({"ocid-ref": 3}, 3),
    "llava": ({}, 4),
}


def copy_fixture(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FIX / name, tmp_path / name))


def by_id(conv: C.Conversion, bench: str | None = None) -> dict[str, EvalItem]:
    return {r.id: r for r in conv.records if bench is None or r.benchmark == bench}


# ---- every format converts and writes loadable files -----------------------------------------------


@pytest.mark.parametrize("name", sorted(CONVERT))
def test_fixture_converts_writes_and_loads(name, tmp_path):
    conv = CONVERT[name](FIX / name)
    benchmarks, n_in = EXPECTED[name]
    assert conv.n_in == n_in == conv.n_out + len(conv.skipped)
    assert conv.counts().get("benchmarks", {}) == benchmarks
    manifest = C.write_conversion(conv, tmp_path / "out")
    out = tmp_path / "out"
    assert manifest["counts"]["in"] == n_in and manifest["counts"]["written"] == conv.n_out
    if conv.kind == "train":
        records = load_train(out / "train" / "llava.json")
    else:
        records = [it for b in benchmarks for it in load_eval(out / "eval" / f"{b}.jsonl")]
    assert len(records) == conv.n_out
    for r in records:  # image paths resolve under the output root; sizes are the files' sizes
        assert r.image.startswith(f"images/{name}/")
        size = list(load_image(out, r).size)
        assert size == (r.image_size if conv.kind == "eval" else r.metadata["image_size"])
        if conv.kind == "eval" and r.box is not None:
            x1, y1, x2, y2 = r.box
            assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]


def test_vqav2_fields():
    items = by_id(CONVERT["vqav2"](FIX / "vqav2"))
    it = items["42000"]
    assert it.question == "What color is the umbrella?" and it.split == "val"
    assert it.answers == ["red", "pink"] + ["red"] * 8  # all 10 annotator answers, in order
    assert it.image == "images/vqav2/COCO_val2014_000000000042.jpg" and it.image_size == [8, 6]
    assert it.metadata == {
        "qtype": "what color is the",
        "answer_type": "other",
        "multiple_choice_answer": "red",
    }


def test_gqa_vizwiz_vsr_tallyqa_ai2d_fields():
    gqa = by_id(CONVERT["gqa"](FIX / "gqa"))["201307251"]
    assert (gqa.answers, gqa.split, gqa.metadata["qtype"]) == (["left"], "testdev_balanced", "query")
    viz = by_id(CONVERT["vizwiz"](FIX / "vizwiz"))
    assert viz["VizWiz_val_00000000"].metadata["answerable"] == 0
    assert viz["VizWiz_val_00000001"].answers[:2] == ["left", "the left one"]
    vsr = by_id(CONVERT["vsr"](FIX / "vsr"))
    assert (vsr["0"].question, vsr["0"].answers) == ("The umbrella is under the bed.", ["False"])
    assert vsr["2"].answers == ["True"] and vsr["2"].metadata["qtype"] == "left of"
    tally = by_id(CONVERT["tallyqa"](FIX / "tallyqa"))
    assert (tally["29003"].answers, tally["29003"].split) == (["P"], "simple")  # count 15 = letter P
    assert (tally["29002"].answers, tally["29002"].split) == (["A"], "complex")
    ai2d = by_id(CONVERT["ai2d"](FIX / "ai2d"))
    assert (ai2d["12.png-0"].split, ai2d["12.png-0"].answers) == ("test", ["B"])  # 12 is in ai2d_test_ids.csv
    assert ai2d["4.png-1"].split == "val" and ai2d["4.png-1"].metadata["choices"][3] == "adult"


def test_textvqa_ocr_and_pure_prompts():
    ocr = by_id(CONVERT["textvqa"](FIX / "textvqa"))["34604"]
    assert ocr.question == "what is the number on the jersey?\nReference OCR token: 22, nike"
    assert ocr.answers == ["22"] * 9 + ["unreadable"] and ocr.image_size == [6, 8]
    pure = by_id(CONVERT["textvqa"](FIX / "textvqa", benchmark="textvqa-pure"))["34604"]
    assert pure.question == ocr.question  # the same text; the pure benchmark's prompt cuts the OCR line
    assert (
        build_prompt("textvqa-pure", pure.model_dump()) == "what is the number on the jersey?" + SHORT_ANSWER
    )
    assert build_prompt("textvqa-ocr", ocr.model_dump()) == ocr.question + SHORT_ANSWER
    plain = C.convert_textvqa(FIX / "textvqa/TextVQA_0.5.1_val.json", FIX / "textvqa/train_images",
                              benchmark="textvqa-pure")  # fmt: skip
    assert by_id(plain)["34604"].question == "what is the number on the jersey?"
    with pytest.raises(ValueError, match="OCR"):
        C.convert_textvqa(FIX / "textvqa/TextVQA_0.5.1_val.json", FIX / "textvqa/train_images")


def test_metadata_carries_the_prompt_fields_the_schema_lacks():
    """EvalItem has no caption / choices fields: VSR and AI2D keep them in metadata for the prompts."""
    vsr = by_id(CONVERT["vsr"](FIX / "vsr"))["0"]
    prompt = build_prompt("vsr", {**vsr.metadata, **vsr.model_dump()})
    assert 'statement "True" or "False"? The umbrella is under the bed.' in prompt
    ai2d = by_id(CONVERT["ai2d"](FIX / "ai2d"))["12.png-0"]
    prompt = build_prompt("ai2d", {**ai2d.metadata, **ai2d.model_dump()})
    assert prompt.startswith("Which planet is closest to the sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\n")
    tally = by_id(CONVERT["tallyqa"](FIX / "tallyqa"))["29003"]
    assert "\nP. 15\n" in build_prompt("tally-qa", tally.model_dump())  # the registry's fixed counts


def test_refcoco_boxes_are_pixel_xyxy_of_the_val_refs():
    conv = CONVERT["refcoco"](FIX / "refcoco")
    assert set(by_id(conv, "refcoco")) == {"1-1", "1-2", "2-3"}  # ref 0 is train: not converted
    assert set(by_id(conv, "refcoco+")) == {"10-20"}  # ref 11 is testA
    assert set(by_id(conv, "refcocog")) == {"20-40", "21-41", "21-42"}
    dog = by_id(conv, "refcoco")["1-2"]
    assert dog.ref == "right dog" and dog.box == [6.5, 1.0, 11.5, 7.5]  # COCO xywh [6.5, 1, 5, 6.5]
    assert dog.image_size == [12, 8] and dog.metadata["refer_dataset"] == "RefCOCO"
    assert by_id(conv, "refcocog")["21-42"].box == [0.5, 1.5, 6.5, 10.5]


def test_ocidref_boxes_and_clutter_splits():
    items = by_id(CONVERT["ocidref"](FIX / "ocidref"))
    assert items["0"].box == [2.0, 3.0, 10.0, 9.0] and items["0"].image_size == [16, 12]
    assert [items[k].split for k in "012"] == ["minimum", "medium", "maximum"]  # take_id 3, 12, 19


def test_ocidref_matches_the_harness_oracle(oracles, tmp_path):
    """Clutter splits and GT boxes of every oracle case (harness: 640x480 pixel xyxy / size, 2 decimals)."""
    oracle = json.loads((oracles / "metrics" / "ocidref.json").read_text())
    for take, split in oracle["get_split_table"].items():
        assert C.clutter_split(int(take)) == split
    Image.new("RGB", (640, 480)).save(tmp_path / "scene.png")
    cases = [c for c in oracle["cases"] if c["gt_box_pixels_640x480"] is not None]  # some are normalised only
    assert len(cases) > 50
    expressions = {
        str(c["id"]): {"take_id": c["take_id"], "scene_path": "scene.png", "sentence": "the object",
                       "bbox": json.dumps(c["gt_box_pixels_640x480"])}
        for c in cases
    }  # fmt: skip
    (tmp_path / "val_expressions.json").write_text(json.dumps(expressions))
    items = by_id(C.convert_ocidref(tmp_path / "val_expressions.json", tmp_path))
    names = dict(zip(C.OCID_CLUTTER, C.OCID_SPLITS, strict=True))
    for c in cases:
        it = items[str(c["id"])]
        assert it.split == names[c["clutter_split"]]
        w, h = it.image_size
        assert [round(v / s, 2) for v, s in zip(it.box, (w, h, w, h), strict=True)] == c["gt_box"]


def test_llava_excludes_text_only_and_keeps_conversations():
    conv = CONVERT["llava"](FIX / "llava")
    assert [r.id for r in conv.records] == ["000000033471", "2361", "1570124"]  # file order
    (skip,) = conv.skipped
    assert skip.excluded and skip.record_id == "i6IyJda_0" and "text-only" in skip.reason
    raw = json.loads((FIX / "llava/llava_v1_5_mix665k.json").read_text())
    assert [t.model_dump(by_alias=True) for t in conv.records[0].conversations] == raw[0]["conversations"]
    pretrain = C.convert_llava(FIX / "llava/blip_laion_cc_sbu_558k.json", FIX / "llava/images")
    assert pretrain.n_out == 2 and pretrain.records[0].conversations[0].value.endswith("<image>")


def test_toy_world_goes_through_the_llava_path_unchanged(tmp_path):
    """The toy world's training file round-trips byte for byte through the real-data path."""
    from vlmlab.data.toyworld import WORLD_PRESETS, generate_world

    world = generate_world(WORLD_PRESETS["smoke"], tmp_path / "world", progress=False)
    conv = C.convert_llava(world / "train" / "llava.json", C.ImageStore(world, prefix=""))
    assert conv.n_out == conv.n_in and not conv.skipped
    C.write_conversion(conv, tmp_path / "out", train_file="llava")
    assert (tmp_path / "out/train/llava.json").read_bytes() == (world / "train" / "llava.json").read_bytes()


# ---- the harness's order and slim subsets ------------------------------------------------------------


def test_harness_permutation_is_the_shuffle_of_ids():
    for n in (0, 1, 7, 500):
        ids = [f"q{i}" for i in range(n)]
        Random(21).shuffle(ids)
        assert ids == [f"q{p}" for p in C.harness_permutation(n)]


def write_pope(folder: Path, n_per_split: dict[str, int]) -> list[str]:
    """A POPE copy with n questions per split (fixture images); returns ids in insertion order."""
    ids = []
    for split, n in n_per_split.items():
        rows = [{"question_id": q, "image": "COCO_val2014_000000310196.jpg", "text": f"Is there a thing {q}?",
                 "label": "yes" if q % 2 else "no"} for q in range(1, n + 1)]  # fmt: skip
        (folder / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        ids += [f"{split}-{q}" for q in range(1, n + 1)]
    return ids


def test_order_and_slim_follow_the_harness_rule(tmp_path):
    """Harness (pope.py): shuffle the id list once with Random(21); slim = first k per split."""
    folder = copy_fixture(tmp_path, "pope")
    ids = write_pope(folder, {"adversarial": 7, "popular": 6, "random": 5})
    conv = CONVERT["pope"](folder)
    Random(21).shuffle(ids)
    assert [r.id for r in conv.records] == ids
    slim = C.slim_records(conv.records, sizes={"pope": 2})
    expected, taken = [], {}
    for i in ids:
        split = i.split("-")[0]
        if taken.get(split, 0) < 2:
            taken[split] = taken.get(split, 0) + 1
            expected.append(i)
    assert [r.id for r in slim] == expected


def test_refcoco_datasets_are_shuffled_together():
    """Harness (refcoco.py): RefCOCO, RefCOCO+, RefCOCOg val sentences in one list, one shuffle."""
    conv = CONVERT["refcoco"](FIX / "refcoco")
    inserted = [("refcoco", "1-1"), ("refcoco", "1-2"), ("refcoco", "2-3"), ("refcoco+", "10-20"),
                ("refcocog", "20-40"), ("refcocog", "21-41"), ("refcocog", "21-42")]  # fmt: skip
    Random(21).shuffle(inserted)
    assert [(r.benchmark, r.id) for r in conv.records] == inserted
    slim = C.slim_records(conv.records, sizes={"refcoco": 1, "refcoco+": 1, "refcocog": 1})
    firsts = {}
    for bench, rid in inserted:
        firsts.setdefault(bench, rid)
    assert {(r.benchmark, r.id) for r in slim} == set(firsts.items())


def test_slim_sizes_are_the_harness_sizes():
    """1024 for VQAv2, 1024 per split for POPE (3 x 1024), no slim set for VSR (oracle README)."""

    def items(bench: str, split: str, n: int) -> list[EvalItem]:
        return [EvalItem(id=f"{split}-{i}", image="a.png", benchmark=bench, split=split, question="q?",
                         answers=["yes"]) for i in range(n)]  # fmt: skip

    records = items("vqa-v2", "val", 1100) + items("vsr", "zeroshot-test", 1300)
    records += [it for s in C.POPE_SPLITS for it in items("pope", s, 1030)]
    slim = C.slim_records(records)
    counts = {b: sum(r.benchmark == b for r in slim) for b in ("vqa-v2", "pope", "vsr")}
    assert counts == {"vqa-v2": 1024, "pope": 3 * 1024, "vsr": 1300}


def test_skipped_records_keep_the_others_in_harness_order(tmp_path):
    folder = copy_fixture(tmp_path, "pope")
    ids = write_pope(folder, {"adversarial": 6, "popular": 4, "random": 3})
    rows = (folder / "coco_pope_popular.json").read_text().splitlines()
    rows[1] = rows[1].replace('"yes"', '"maybe"').replace('"no"', '"maybe"')  # popular-2 becomes bad
    (folder / "coco_pope_popular.json").write_text("\n".join(rows) + "\n")
    conv = CONVERT["pope"](folder, skip_bad=True)
    Random(21).shuffle(ids)
    assert [r.id for r in conv.records] == [i for i in ids if i != "popular-2"]


# ---- bad input -----------------------------------------------------------------------------------------


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_lines(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    fn(lines)
    path.write_text("\n".join(lines) + "\n")


def _refcoco_negative_width(d: Path) -> None:
    def edit(data):
        next(a for a in data["annotations"] if a["id"] == 1003)["bbox"] = [6.5, 1.5, -6.0, 9.0]

    _edit_json(d / "refcoco/instances.json", edit)


def _gqa_duplicate_key(d: Path) -> None:
    path = d / "testdev_balanced_questions.json"
    data = json.loads(path.read_text())
    again = json.dumps({"20968379": data["20968379"]})[1:-1]
    path.write_text(json.dumps(data)[:-1] + ", " + again + "}")  # a JSON object with a repeated key


# (dataset, mutation, file named in the error, record index, record id, reason fragment)
BAD = {
    "missing image": ("vqav2", lambda d: (d / "val2014/COCO_val2014_000000000073.jpg").unlink(),
                      "v2_mscoco_val2014_annotations.json", 2, "73000", "not found"),
    "unreadable image": ("gqa", lambda d: (d / "images/n161313.jpg").write_bytes(b"not an image at all"),
                         "testdev_balanced_questions.json", 2, "201307251", "cannot read image"),
    "box x2 < x1": ("refcoco", _refcoco_negative_width, "refs(unc).p", 2, "2-3", "x1 < x2"),
    "box outside the image": ("ocidref", lambda d: _edit_json(
        d / "val_expressions.json", lambda x: x["0"].update(bbox="[2, 3, 40, 9]")),
        "val_expressions.json", 0, "0", "outside the 16x12 image"),
    "missing field": ("vizwiz", lambda d: _edit_json(d / "val.json", lambda x: x[1].pop("question")),
                      "val.json", 1, "VizWiz_val_00000001.jpg", "field 'question' is missing"),
    "ill-typed field": ("tallyqa", lambda d: _edit_json(d / "test.json", lambda x: x[0].update(answer="two")),
                        "test.json", 0, "29001", "expected an integer"),
    "duplicate id": ("tallyqa", lambda d: _edit_json(d / "test.json", lambda x: x.append(dict(x[0]))),
                     "test.json", 3, "29001", "duplicate id '29001' (first at record 0)"),
    "duplicate key": ("gqa", _gqa_duplicate_key, "testdev_balanced_questions.json", 3, "20968379",
                      "duplicate id '20968379'"),
    "JSON line cut mid-way": ("pope", lambda d: _edit_lines(
        d / "coco_pope_random.json", lambda ls: ls.__setitem__(1, ls[1][:25])),
        "coco_pope_random.json", 1, None, "invalid JSON"),
    "image path leaving the folder": ("vsr", lambda d: _edit_lines(
        d / "test.jsonl", lambda ls: ls.__setitem__(2, ls[2].replace("000000502380.jpg", "../../x.jpg"))),
        "test.jsonl", 2, "2", "leaves the image folder"),
    "bad label": ("pope", lambda d: _edit_lines(
        d / "coco_pope_popular.json", lambda ls: ls.__setitem__(0, ls[0].replace('"yes"', '"maybe"'))),
        "coco_pope_popular.json", 0, "popular-1", "'yes' or 'no'"),
    "broken conversation": ("llava", lambda d: _edit_json(
        d / "llava_v1_5_mix665k.json", lambda x: x[0]["conversations"].pop()),
        "llava_v1_5_mix665k.json", 0, "000000033471", "last turn must be a gpt answer"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_or_is_skipped(case, tmp_path):
    name, mutate, file, index, rid, reason = BAD[case]
    folder = copy_fixture(tmp_path, name)
    mutate(folder)
    with pytest.raises(DataError) as err:
        CONVERT[name](folder)
    msg = str(err.value)
    assert file in msg and f"record {index}" in msg and reason in msg
    assert err.value.index == index and err.value.record_id == rid
    if rid is not None:
        assert f"(id {rid!r})" in msg

    conv = CONVERT[name](folder, skip_bad=True)
    bad = [s for s in conv.skipped if not s.excluded]
    assert len(bad) == 1 and bad[0].index == index and reason in bad[0].reason and file in bad[0].path
    assert conv.n_in == conv.n_out + len(conv.skipped)
    assert conv.n_out == EXPECTED[name][1] - len(conv.skipped) + (case == "duplicate id") + (
        case == "duplicate key"
    )


def test_a_json_file_cut_mid_way_is_always_an_error(tmp_path):
    folder = copy_fixture(tmp_path, "vqav2")
    path = folder / "v2_mscoco_val2014_annotations.json"
    path.write_text(path.read_text()[:300])
    for skip_bad in (False, True):
        with pytest.raises(
            DataError, match=r"v2_mscoco_val2014_annotations\.json: invalid JSON at line \d+ column"
        ):
            CONVERT["vqav2"](folder, skip_bad=skip_bad)


def test_refs_pickles_are_read_without_executing_code(tmp_path):
    folder = copy_fixture(tmp_path, "refcoco")

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    (folder / "refcoco/refs(unc).p").write_bytes(pickle.dumps([Evil()], protocol=2))
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: cannot read refs"):
        CONVERT["refcoco"](folder)


def test_image_checks_header_decode_exists(tmp_path):
    folder = copy_fixture(tmp_path, "ocidref")
    png = folder / "OCID-dataset/YCB10/floor/bottom/seq03/rgb/result_2018-08-24-15-19-43.png"
    png.write_bytes(png.read_bytes()[:-30])  # header intact, pixel data cut
    expressions, images = folder / "val_expressions.json", folder / "OCID-dataset"
    assert C.convert_ocidref(expressions, images).n_out == 3  # the header still reads
    with pytest.raises(DataError, match="cannot read image"):
        C.convert_ocidref(expressions, C.ImageStore(images, "images/ocidref", check="decode"))
    # "exists" measures nothing: sizes come from the annotation where it has them (TextVQA), else none
    tv = CONVERT["textvqa"](FIX / "textvqa", images=C.ImageStore(FIX / "textvqa/train_images", "i", "exists"))
    vqa = CONVERT["vqav2"](FIX / "vqav2", images=C.ImageStore(FIX / "vqav2/val2014", "i", "exists"))
    assert by_id(tv)["34604"].image_size == [6, 8] and by_id(vqa)["42000"].image_size is None


def test_rename_duplicates_keeps_both_and_reports(tmp_path):
    folder = copy_fixture(tmp_path, "tallyqa")
    _edit_json(folder / "test.json", lambda x: x.append(dict(x[0])))
    conv = CONVERT["tallyqa"](folder, rename_duplicates=True)
    assert conv.n_out == 4 and "29001#2" in by_id(conv) and len(conv.renamed) == 1


# ---- writing, slim roots, downloads, command line ---------------------------------------------------


def test_write_links_or_copies_images(tmp_path):
    conv = CONVERT["vqav2"](FIX / "vqav2")
    out = tmp_path / "linked"
    assert C.write_conversion(conv, out)["images"]["mode"] == "link"
    assert (out / "images/vqav2").is_symlink()
    C.write_conversion(conv, out)  # writing again over the same link is fine
    other = C.convert_vqav2(FIX / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
                            FIX / "vqav2/v2_mscoco_val2014_annotations.json",
                            copy_fixture(tmp_path, "vqav2") / "val2014")  # fmt: skip
    with pytest.raises(FileExistsError):
        C.write_conversion(other, out)  # the link points elsewhere
    copied = tmp_path / "copied"
    C.write_conversion(conv, copied, copy_images=True)
    assert not (copied / "images/vqav2").is_symlink()
    assert sorted(p.name for p in (copied / "images/vqav2").iterdir()) == sorted(
        p.name for p in (FIX / "vqav2/val2014").iterdir()
    )


def test_make_slim_writes_the_subset_with_its_images(tmp_path):
    folder = copy_fixture(tmp_path, "pope")
    write_pope(folder, {"adversarial": 5, "popular": 5, "random": 5})
    conv = CONVERT["pope"](folder)
    C.write_conversion(conv, tmp_path / "full")
    written = C.make_slim(tmp_path / "full", tmp_path / "slim", sizes={"pope": 3})
    assert written == {"pope": 9}
    slim = load_eval(tmp_path / "slim/eval/pope.jsonl")
    assert [r.id for r in slim] == [r.id for r in C.slim_records(conv.records, sizes={"pope": 3})]
    assert all(load_image(tmp_path / "slim", r).size == (8, 6) for r in slim)
    assert not (tmp_path / "slim/images/pope").is_symlink()


def test_cli_counts_and_skipped_reasons(tmp_path, capsys):
    folder = copy_fixture(tmp_path, "vqav2")
    args = ["--src", str(folder), "--images", str(folder / "val2014"), "--out", str(tmp_path / "out")]
    assert C.run_cli("vqav2", args) == 0
    assert "vqav2: in 3 | out 3 | skipped 0" in capsys.readouterr().out
    (folder / "val2014/COCO_val2014_000000000073.jpg").unlink()
    assert C.run_cli("vqav2", args) == 1
    err = capsys.readouterr().err
    assert "v2_mscoco_val2014_annotations.json: record 2 (id '73000')" in err and "not found" in err
    assert C.run_cli("vqav2", [*args, "--skip-bad", "--slim"]) == 0
    out = capsys.readouterr().out
    assert "in 3 | out 2 | skipped 1 (bad 1, excluded 0) | written 2 (slim)" in out
    assert "skipped (1):" in out and "record 2 (id '73000')" in out
    assert len(load_eval(tmp_path / "out/eval/vqa-v2.jsonl")) == 2


def test_cli_textvqa_writes_both_benchmarks_and_llava_a_named_file(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--src", str(FIX / "textvqa"), "--images", str(FIX / "textvqa/train_images"), "--out", str(out)]
    assert C.run_cli("textvqa", args) == 0
    assert {p.name for p in (out / "eval").iterdir()} == {"textvqa-ocr.jsonl", "textvqa-pure.jsonl"}
    llava = ["--src", str(FIX / "llava/blip_laion_cc_sbu_558k.json"), "--images", str(FIX / "llava/images")]
    assert C.run_cli("llava", [*llava, "--out", str(out), "--train-file", "llava_pretrain"]) == 0
    assert len(load_train(out / "train/llava_pretrain.json")) == 2
    assert json.loads((out / "manifests/llava_pretrain.json").read_text())["counts"]["in"] == 2
    capsys.readouterr()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_fetch_downloads_and_unzips_from_a_url(tmp_path):
    val = (FIX / "vizwiz/val.json").read_bytes()
    archive = _zip(
        tmp_path / "Annotations.zip", {"Annotations/train.json": b"[]", "Annotations/val.json": val}
    )
    sources = (C.Download("val.json", archive.as_uri(), ("val.json",)),
               C.Download("test.jsonl", (FIX / "vsr/test.jsonl").as_uri()),
               C.Download("images", "file:///nowhere.zip", images=True))  # fmt: skip
    got = C.fetch(sources, tmp_path / "src", progress=False)
    assert [p.name for p in got] == ["val.json", "test.jsonl"]
    assert (tmp_path / "src/val.json").read_bytes() == val and not (tmp_path / "src/train.json").exists()
    assert (tmp_path / "src/test.jsonl").read_bytes() == (FIX / "vsr/test.jsonl").read_bytes()
    archive.unlink()  # present files are not fetched again
    assert C.fetch(sources, tmp_path / "src", progress=False) == got
    assert not list((tmp_path / "src").glob(".*part"))


def test_extract_refuses_members_leaving_the_folder(tmp_path):
    archive = _zip(tmp_path / "evil.zip", {"../evil.txt": b"x"})
    with pytest.raises(DataError, match="would leave"):
        C.extract(archive, tmp_path / "dest")
    assert not (tmp_path / "evil.txt").exists()


def test_cli_download_with_a_url_override(tmp_path, capsys):
    url = f"test.jsonl={(FIX / 'vsr/test.jsonl').as_uri()}"
    args = ["--src", str(tmp_path / "src"), "--download", "--url", url, "--images", str(FIX / "vsr/images"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert C.run_cli("vsr", args) == 0
    assert "vsr: in 3 | out 3 | skipped 0" in capsys.readouterr().out
    assert len(load_eval(tmp_path / "out/eval/vsr.jsonl")) == 3
