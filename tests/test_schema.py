"""Unified data schema: validation rules, loaders' error messages, image loading, atomic writers."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmlab.data import (
    ClassItem,
    DataError,
    EvalItem,
    TrainRecord,
    load_class,
    load_eval,
    load_image,
    load_train,
    write_json,
    write_jsonl,
)


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"from": f, "value": v} for f, v in turns]


def train_rec(i: int = 0, **kw) -> dict:
    rec = {
        "id": f"tr-{i}",
        "image": "images/a.png",
        "conversations": conv(("human", "<image>\nWhat color is it?"), ("gpt", "red")),
    }
    rec.update(kw)
    return rec


def vqa_item(i: int = 0, **kw) -> dict:
    item = {
        "id": f"vqa-{i:06d}",
        "image": "images/a.png",
        "benchmark": "toy-vqa",
        "split": "test",
        "question": "How many circles are there?",
        "answers": ["2"] * 10,
        "metadata": {"qtype": "count"},
    }
    item.update(kw)
    return item


def ref_item(i: int = 0, **kw) -> dict:
    item = {
        "id": f"ref-{i:06d}",
        "image": "images/a.png",
        "benchmark": "toy-ref",
        "split": "test",
        "ref": "the red circle",
        "box": [1.0, 2.0, 30.0, 20.0],
        "image_size": [64, 48],
    }
    item.update(kw)
    return item


# ---- validation rules ------------------------------------------------------------------------------


def test_train_record_llava_format_round_trip(tmp_path):
    recs = [
        train_rec(0),
        train_rec(1, metadata={"task": "ref", "box": [0, 0, 10, 12], "image_size": [64, 48]}),
        train_rec(
            2, conversations=conv(("human", "Q1 <image>"), ("gpt", "a"), ("human", "Q2"), ("gpt", "b"))
        ),
    ]
    path = write_json(tmp_path / "llava.json", recs)
    raw = json.loads(path.read_text())
    assert raw[0]["conversations"][0] == {"from": "human", "value": "<image>\nWhat color is it?"}
    got = load_train(path)
    assert [r.id for r in got] == ["tr-0", "tr-1", "tr-2"]
    assert got[2].conversations[3].from_ == "gpt" and got[1].metadata["box"] == [0, 0, 10, 12]
    # a re-write of the loaded records gives the same bytes (aliases and key order kept)
    assert write_json(tmp_path / "again.json", got).read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([("gpt", "<image> hi"), ("human", "x")], "expected 'human'"),
        ([("human", "<image> q"), ("human", "q2")], "expected 'gpt'"),
        ([("human", "<image> q")], "at least one human turn"),
        ([("human", "<image> q"), ("gpt", "a"), ("human", "q2")], "last turn"),
        ([("human", "no image token"), ("gpt", "a")], "exactly once, found 0"),
        ([("human", "<image><image> q"), ("gpt", "a")], "exactly once, found 2"),
        ([("human", "<image> q"), ("gpt", "<image>")], "turn 1 contains"),
        ([("human", "<image> q"), ("bot", "a")], "'human' or 'gpt'"),
    ],
)
def test_train_record_conversation_rules(turns, message):
    with pytest.raises(ValueError, match=message):
        TrainRecord.model_validate(train_rec(conversations=conv(*turns)))


def test_train_record_grounding_metadata_checked():
    with pytest.raises(ValueError, match="outside the 64x48 image"):
        TrainRecord.model_validate(
            train_rec(metadata={"task": "ref", "box": [0, 0, 10, 50], "image_size": [64, 48]})
        )
    with pytest.raises(ValueError, match="needs 'box'"):
        TrainRecord.model_validate(train_rec(metadata={"task": "ref", "image_size": [64, 48]}))
    with pytest.raises(ValueError, match="list of 4 numbers"):
        TrainRecord.model_validate(
            train_rec(metadata={"task": "ref", "box": "0 0 1 1", "image_size": [64, 48]})
        )


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (vqa_item(ref="the red circle"), "exactly one of them"),
        (vqa_item(question=None), "exactly one of them"),
        (vqa_item(answers=None), "'answers': required"),
        (vqa_item(answers=[]), "must not be empty"),
        (vqa_item(answers="2"), "valid list"),
        (ref_item(box=None), "'box': required"),
        (ref_item(box=[10.0, 2.0, 10.0, 20.0]), "x1 < x2"),
        (ref_item(box=[1.0, 2.0, 3.0]), "got 3 numbers"),
        (ref_item(box=[1.0, 2.0, 65.0, 20.0]), "outside the 64x48 image"),
        (ref_item(image_size=[64, 0]), "image_size"),
        (ref_item(extra_field=1), "Extra inputs"),
    ],
)
def test_eval_item_rules(item, message):
    with pytest.raises(ValueError, match=message):
        EvalItem.model_validate(item)


def test_eval_and_class_items_valid():
    assert EvalItem.model_validate(vqa_item()).task == "vqa"
    assert EvalItem.model_validate(ref_item()).task == "ref"
    assert EvalItem.model_validate(ref_item(image_size=None, box=[0, 0, 1000, 1000])).box == [
        0,
        0,
        1000,
        1000,
    ]
    assert ClassItem(id="a", image="x.png", label=3, label_name="red square").label == 3
    with pytest.raises(ValueError):
        ClassItem.model_validate(
            {"id": "a", "image": "x.png", "label": "3", "label_name": "x"}
        )  # strict types
    with pytest.raises(ValueError):
        ClassItem.model_validate({"id": "a", "image": "x.png", "label": -1, "label_name": "x"})


# ---- loaders locate errors -------------------------------------------------------------------------


def test_error_names_file_record_id_and_field(tmp_path):
    items = [vqa_item(i) for i in range(20)]
    items[17]["answers"] = []
    path = write_jsonl(tmp_path / "toy-vqa.jsonl", items)
    with pytest.raises(DataError) as e:
        load_eval(path)
    assert str(e.value).startswith(f"{path}: record 17 (id 'vqa-000017'): field 'answers': ")
    assert (e.value.index, e.value.record_id, e.value.field) == (17, "vqa-000017", "answers")
    # model-level rules name their field too
    items[17] = vqa_item(17, answers=None)
    with pytest.raises(DataError, match=r"record 17 \(id 'vqa-000017'\): field 'answers': required") as e:
        load_eval(write_jsonl(path, items))
    assert e.value.field == "answers"
    # nested fields are spelled out
    recs = [
        train_rec(0),
        train_rec(1, conversations=[{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]),
    ]
    with pytest.raises(DataError, match=r"record 1 \(id 'tr-1'\): field 'conversations.0.value'"):
        load_train(write_json(tmp_path / "llava.json", recs))
    with pytest.raises(DataError, match=r"record 0: expected a JSON object, got list"):
        load_class(write_jsonl(tmp_path / "c.jsonl", [[1, 2]]))


def test_truncated_json_names_file_and_position(tmp_path):
    path = write_json(tmp_path / "llava.json", [train_rec(i) for i in range(5)])
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=rf"{path}: invalid JSON at line 1 column \d+ \(char \d+\)"):
        load_train(path)
    write_json(path, {"not": "a list"})
    with pytest.raises(DataError, match="expected a JSON list"):
        load_train(path)
    jl = write_jsonl(tmp_path / "e.jsonl", [ref_item(i) for i in range(4)])
    lines = jl.read_text().splitlines()
    jl.write_text("\n".join(lines[:2] + [lines[2][:40]] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=rf"{jl}: record 2 \(line 3\): invalid JSON at column"):
        load_eval(jl)
    with pytest.raises(DataError, match="cannot read"):
        load_eval(tmp_path / "missing.jsonl")


def test_duplicate_ids_name_both_records(tmp_path):
    items = [ref_item(0), ref_item(1), ref_item(2), ref_item(1)]
    with pytest.raises(DataError, match=r"duplicate id 'ref-000001' at records 1 and 3"):
        load_eval(write_jsonl(tmp_path / "r.jsonl", items))


def test_load_image_errors_name_file_and_record(tmp_path):
    (tmp_path / "images").mkdir()
    good = tmp_path / "images" / "ok.png"
    Image.new("RGB", (32, 24), (1, 2, 3)).save(good)
    img = load_image(tmp_path, {"id": "x", "image": "images/ok.png"})
    assert img.mode == "RGB" and img.size == (32, 24)
    Image.new("L", (8, 8), 5).save(tmp_path / "images" / "gray.png")
    assert load_image(tmp_path, EvalItem.model_validate(ref_item(image="images/gray.png"))).mode == "RGB"

    with pytest.raises(DataError, match=r"images/nope\.png: image of record 'ref-000000' not found"):
        load_image(tmp_path, EvalItem.model_validate(ref_item(image="images/nope.png")))
    (tmp_path / "images" / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=r"junk\.png: cannot read image of record 'j'"):
        load_image(tmp_path, {"id": "j", "image": "images/junk.png"})
    noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    noisy.save(tmp_path / "images" / "full.png")
    data = (tmp_path / "images" / "full.png").read_bytes()
    (tmp_path / "images" / "cut.png").write_bytes(data[: len(data) // 2])  # truncated: fails on decode
    with pytest.raises(DataError, match=r"cut\.png: cannot read image of record 'c'") as e:
        load_image(tmp_path, {"id": "c", "image": "images/cut.png"})
    assert e.value.record_id == "c"


# ---- writers ---------------------------------------------------------------------------------------


def test_writers_are_atomic_and_deterministic(tmp_path):
    path = write_jsonl(
        tmp_path / "d" / "c.jsonl", [ClassItem(id="a", image="i.png", label=1, label_name="n")]
    )
    assert path.read_text() == '{"id": "a", "image": "i.png", "label": 1, "label_name": "n"}\n'

    def broken():
        yield {"id": "b"}
        raise RuntimeError("generator failed half-way")

    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    with pytest.raises(ValueError):
        write_json(path, {"x": float("nan")})  # not JSON
    assert path.read_text().startswith('{"id": "a"')  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.jsonl"]  # no temp files left
    write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]}, indent=1)
    assert (tmp_path / "m.json").read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
