"""vlmlab.evaluate.benchmarks: the registry's prompts, groups, thresholds and set sizes.

Expected prompt strings are the harness's user messages as the oracle README lists them
(vlm-evaluation's Prismatic wrapper), which start with a newline where our templates do not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmlab.evaluate import benchmarks as B

ROOT = Path(__file__).resolve().parents[1]
SHORT = "\nAnswer the question using a single word or phrase."
MC = "\nAnswer with the option's letter from the given choices directly."


def harness_message(name: str, item: dict) -> str:
    return B.HARNESS_MESSAGE_PREFIX + B.build_prompt(name, item)


@pytest.mark.parametrize("name", ["vqa-v2", "gqa", "pope", "textvqa-ocr"])
def test_short_answer_prompts(name):
    assert harness_message(name, {"question": "What color is the bus?"}) == "\nWhat color is the bus?" + SHORT


def test_vizwiz_prompt():
    expected = (
        "\nIs this milk?\nWhen the provided information is insufficient, respond with 'Unanswerable'."
        "\nAnswer the question using a single word or phrase."
    )
    assert harness_message("vizwiz", {"question": "Is this milk?"}) == expected


def test_textvqa_pure_cuts_the_ocr_line():
    q = "what brand is this?\nReference OCR token: coca, cola\nReference OCR token: x"
    assert B.build_prompt("textvqa-ocr", {"question": q}) == q + SHORT
    assert B.build_prompt("textvqa-pure", {"question": q}) == "what brand is this?" + SHORT


def test_vsr_prompt():
    expected = (
        '\nBased on the image, is this statement "True" or "False"? The cat is under the table.'
        '\nRespond with "True" or "False" directly.'
    )
    assert harness_message("vsr", {"caption": "The cat is under the table."}) == expected


def test_multiple_choice_prompts():
    tally = harness_message("tally-qa", {"question": "How many dogs are there?"})
    counts = "\n".join(f"{chr(ord('A') + i)}. {i}" for i in range(16))
    assert tally == "\nHow many dogs are there?\n" + counts + MC
    assert tally.splitlines()[-2] == "P. 15"
    ai2d = B.build_prompt(
        "ai2d", {"question": "Which is a producer?", "choices": ["grass", "fox", "owl", "hawk"]}
    )
    assert ai2d == "Which is a producer?\nA. grass\nB. fox\nC. owl\nD. hawk" + MC
    # A dumped record may carry choices=None: TallyQA falls back to its counts, AI2D cannot.
    assert B.build_prompt("tally-qa", {"question": "How many dogs are there?", "choices": None}) == tally[1:]
    with pytest.raises(KeyError, match="choices"):
        B.build_prompt("ai2d", {"question": "q"})


@pytest.mark.parametrize("name", ["refcoco", "refcoco+", "refcocog", "ocid-ref", "toy-ref"])
def test_grounding_prompt(name):
    expected = (
        'Please provide the bounding box coordinate of the region this sentence describes: "man in red"'
    )
    assert B.build_prompt(name, {"ref": "man in red"}) == expected


def test_toy_benchmarks():
    vqa, ref = B.get_benchmark("toy-vqa"), B.get_benchmark("toy-ref")
    assert vqa.prompt == "{question}\nAnswer the question using a single word or phrase."
    assert (vqa.group, vqa.metric, vqa.scoring) == ("vqa", "vqa-accuracy", "generate")
    assert (
        ref.prompt
        == 'Please provide the bounding box coordinate of the region this sentence describes: "{ref}"'
    )
    assert (ref.group, ref.metric, ref.iou_threshold) == ("loc", "acc@iou", 0.5)


def test_groups_thresholds_and_scoring():
    assert set(B.list_benchmarks("loc")) == {"refcoco", "refcoco+", "refcocog", "ocid-ref", "toy-ref"}
    assert B.get_benchmark("ocid-ref").iou_threshold == 0.25  # Q19
    assert all(B.get_benchmark(n).iou_threshold == 0.5 for n in ("refcoco", "refcoco+", "refcocog"))
    probability_scored = {
        n: B.get_benchmark(n).answer_strings for n in B.BENCHMARKS if B.get_benchmark(n).answer_strings
    }
    assert probability_scored == {
        "pope": ("Yes", "No"),
        "vsr": ("True", "False"),
        "tally-qa": tuple("ABCDEFGHIJKLMNOP"),
        "ai2d": ("A", "B", "C", "D"),
    }
    assert B.get_benchmark("pope").splits == ("adversarial", "popular", "random")
    assert B.get_benchmark("tally-qa").splits == ("simple", "complex")


def test_slim_sizes():
    totals = {n: B.get_benchmark(n).slim_total for n in B.BENCHMARKS if not n.startswith("toy")}
    assert totals == {
        "vqa-v2": 1024, "gqa": 1024, "vizwiz": 1024, "textvqa-ocr": 1024, "textvqa-pure": 1024,
        "pope": 3072, "vsr": 1222, "tally-qa": 2048, "ai2d": 2048,
        "refcoco": 1024, "refcoco+": 1024, "refcocog": 1024, "ocid-ref": 3072,
    }  # fmt: skip
    assert B.get_benchmark("pope").full_size == 8910  # the builder's count, not the config's 9000 (Q17)


def test_every_preset_benchmark_is_registered():
    for preset in sorted((ROOT / "vlmlab" / "presets").glob("*.yaml")):
        names = (yaml.safe_load(preset.read_text()).get("eval") or {}).get("benchmarks", [])
        for name in names:
            assert B.get_benchmark(name).name == B.ALIASES.get(name, name), preset.name


def test_unknown_names_and_missing_fields():
    with pytest.raises(KeyError, match="known: .*toy-vqa"):
        B.get_benchmark("coco-caption")
    assert B.get_benchmark("vqav2") is B.get_benchmark("vqa-v2")
    with pytest.raises(KeyError, match="lacks \\['ref'\\]"):
        B.build_prompt("refcoco", {"question": "q"})
    with pytest.raises(ValueError, match="iou_threshold"):
        B.Benchmark("bad", "loc", "{ref}", "acc@iou")
    with pytest.raises(ValueError, match="group"):
        B.Benchmark("bad", "ocr", "{question}", "vqa-accuracy")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_item_text_is_inserted_verbatim(text):
    # Braces or format specs inside a question must not be interpreted.
    assert B.build_prompt("toy-vqa", {"question": text}) == text + SHORT
    assert B.build_prompt("toy-ref", {"ref": text}).endswith(f'describes: "{text}"')
