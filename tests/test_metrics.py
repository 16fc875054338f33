"""vlmlab.evaluate.metrics against the oracle cases of the official VQA code and vlm-evaluation.

Every case of every oracle file must reproduce: strings and booleans exactly, per-question
accuracies to 1e-9, set-level numbers as the scorers return them (see the oracle README).
"""

from __future__ import annotations

import json
import math
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmlab.evaluate import metrics as M

TOL = 1e-9


def load(oracles, name: str) -> dict:
    return json.loads((oracles / "metrics" / name).read_text())


def by_id(cases: list[dict]) -> dict:
    return {c["id"]: c for c in cases}


# ----------------------------------------------------------------------------------------------
# Tables and normalisation
# ----------------------------------------------------------------------------------------------


def test_rules_tables_match_official(oracles):
    t = load(oracles, "vqa_rules_tables.json")
    assert list(M.PUNCTUATION_MARKS) == t["punctuation_marks_in_order"]
    assert not set(M.PUNCTUATION_MARKS) & set(t["ascii_punctuation_NOT_in_list"])
    assert M.NUMBER_WORDS == t["number_words"]
    assert M.ARTICLES == set(t["articles"])
    assert M.CONTRACTIONS == t["contractions"]
    assert M.VIZWIZ_CONTRACTIONS == t["vizwiz_contractions"]
    # The capitalised keys can never match a lower-cased token (Q6).
    for key in t["contraction_keys_unreachable_after_lowercasing"]:
        assert M.process_digit_article(key) == key.lower()


NORMALIZERS = {
    "normalized": M.normalize_answer,
    "after_punctuation_only": lambda s: M.process_punctuation(M.clean_whitespace(s)),
    "vlm_eval_vqav2": lambda s: M.normalize_answer(s, "vlm-eval"),
    "textvqa_evalai": M.normalize_textvqa,
    "vizwiz": M.normalize_vizwiz,
    "gqa_vlm_eval": M.normalize_gqa,
}


@pytest.mark.parametrize("column", list(NORMALIZERS))
def test_normalizers_match_every_pair(oracles, column):
    pairs = load(oracles, "vqa_normalize.json")["pairs"]
    bad = [
        (p["raw"], NORMALIZERS[column](p["raw"]), p[column])
        for p in pairs
        if NORMALIZERS[column](p["raw"]) != p[column]
    ]
    assert not bad, f"{len(bad)} of {len(pairs)} differ, e.g. {bad[:3]}"


# ----------------------------------------------------------------------------------------------
# VQA accuracy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "field"), [("official", "accuracy"), ("vlm-eval", "accuracy_vlm_eval")])
def test_vqa_accuracy_every_case(oracles, variant, field):
    cases = load(oracles, "vqa_accuracy.json")["cases"]
    bad = [
        (c["id"], c["prediction"], got, c[field])
        for c in cases
        if abs((got := M.vqa_accuracy(c["prediction"], c["answers"], variant)) - c[field]) > TOL
    ]
    assert not bad, f"{len(bad)} of {len(cases)} differ, e.g. {bad[:3]}"


def test_vqa_variants_differ_where_the_oracle_says(oracles):
    data = load(oracles, "vqa_accuracy.json")
    differ = [
        c["id"]
        for c in data["cases"]
        if M.vqa_accuracy(c["prediction"], c["answers"])
        != M.vqa_accuracy(c["prediction"], c["answers"], "vlm-eval")
    ]
    expected = [c["id"] for c in data["cases"] if c["accuracy"] != c["accuracy_vlm_eval"]]
    assert differ == expected
    assert len(differ) == data["aggregate"]["n_cases_where_vlm_eval_differs_from_official"]


def test_vqa_set_scores_match_aggregate(oracles):
    data = load(oracles, "vqa_accuracy.json")
    preds = [c["prediction"] for c in data["cases"]]
    answers = [c["answers"] for c in data["cases"]]
    agg = data["aggregate"]
    assert M.vqa_scores(preds, answers, "official")["accuracy"] == agg["official_overall_percent_rounded2"]
    assert M.vqa_scores(preds, answers, "vlm-eval")["accuracy"] == agg["vlm_eval_overall_percent_rounded2"]


@pytest.mark.parametrize(("m", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_table(m, expected):
    answers = ["cat"] * m + ["dog"] * (10 - m)
    assert M.leave_one_out_accuracy("cat", answers) == pytest.approx(expected, abs=TOL)


def test_documented_quirks():
    ten_yes = ["yes"] * 10
    assert M.vqa_accuracy("Yes", ten_yes) == 0.0  # all-identical shortcut: raw comparison (Q7)
    assert M.vqa_accuracy("Yes", ten_yes, "vlm-eval") == 1.0
    assert M.normalize_answer("red/white 1,000") == "redwhite 1000"  # comma rule deletes every mark (Q3)
    assert M.normalize_answer("a.5") == "a.5" and M.normalize_answer("5.") == "5"  # period rule (Q1)
    assert M.normalize_answer("." * 40 + "x") == "." * 8 + "x"  # at most 32 periods removed (Q2)
    assert M.normalize_answer("none") == "0"  # Q5
    assert M.normalize_vizwiz("dont know") == "don`t know"  # Q13


# ----------------------------------------------------------------------------------------------
# TextVQA, VizWiz, GQA
# ----------------------------------------------------------------------------------------------


def test_textvqa_cases_and_sets(oracles):
    data = load(oracles, "textvqa.json")
    for c in data["cases"]:
        assert M.normalize_textvqa(c["prediction"]) == c["prediction_processed"], c["id"]
        assert [M.normalize_textvqa(a) for a in c["answers"]] == c["answers_processed"], c["id"]
        assert abs(M.textvqa_accuracy(c["prediction"], c["answers"]) - c["accuracy"]) <= TOL, c["id"]
        assert abs(M.vqa_accuracy(c["prediction"], c["answers"]) - c["vqa_official_accuracy"]) <= TOL, c["id"]
    cases = by_id(data["cases"])
    for s in data["sets"]:
        items = s["items"]
        got = M.textvqa_scores(
            [i["model_output_ocr"] for i in items],
            [i["model_output_no_ocr"] for i in items],
            [cases[i["case_id"]]["answers"] for i in items],
        )
        assert got == s["metrics"], s["set_id"]


def test_textvqa_needs_ten_answers():
    with pytest.raises(ValueError, match="exactly 10"):
        M.textvqa_accuracy("a", ["a"] * 9)


def test_vizwiz_cases_and_sets(oracles):
    data = load(oracles, "vizwiz.json")
    for c in data["cases"]:
        assert M.normalize_vizwiz(c["prediction"]) == c["prediction_normalized"], c["id"]
        assert abs(M.vizwiz_accuracy(c["prediction"], c["answers"]) - c["accuracy"]) <= TOL, c["id"]
        assert int(M.normalize_vizwiz(c["prediction"]) != "unanswerable") == c["predicted_answerable"], c[
            "id"
        ]
    cases = by_id(data["cases"])
    for s in data["sets"]:
        cs = [cases[i] for i in s["case_ids"]]
        got = M.vizwiz_scores(
            [c["prediction"] for c in cs], [c["answers"] for c in cs], [c["answerable"] for c in cs]
        )
        assert got == s["metrics"], s["set_id"]


def _gqa_structural_type(case: dict) -> str:
    """The fixture tags most questions with their structural type; untagged yes/no golds are binary."""
    for t in ("query", "verify", "logical", "compare", "choose"):
        if t in case["tags"]:
            return t
    return "verify" if case["gold"] in ("yes", "no") else "query"


def test_gqa_cases_and_sets(oracles):
    data = load(oracles, "gqa.json")
    for c in data["cases"]:
        assert M.normalize_gqa(c["prediction"]) == c["processed_prediction"], c["id"]
        assert M.gqa_correct(c["prediction"], c["gold"]) == c["correct"], c["id"]
    cases = by_id(data["cases"])
    for s in data["sets"]:
        cs = [cases[i] for i in s["case_ids"]]
        got = M.gqa_scores(
            [c["prediction"] for c in cs], [c["gold"] for c in cs], [_gqa_structural_type(c) for c in cs]
        )
        assert got["accuracy"] == s["metrics"]["accuracy"] == s["eval_py_printed"]["Accuracy"]
        assert (got["binary"], got["open"]) == (s["eval_py_printed"]["Binary"], s["eval_py_printed"]["Open"])
        assert sum(M.gqa_correct(c["prediction"], c["gold"]) for c in cs) == s["n_correct"]


# ----------------------------------------------------------------------------------------------
# Probability-scored: POPE, VSR, TallyQA, AI2D
# ----------------------------------------------------------------------------------------------


def test_pope_cases_and_sets(oracles):
    data = load(oracles, "pope.json")
    cases = by_id(data["cases"])
    for c in data["cases"]:
        predicted = ["yes", "no"][M.argmax_first(c["yes_no_probabilities"])]
        assert predicted == c["predicted"] and (predicted == c["ground_truth_answer"]) == c["correct"], c[
            "id"
        ]
    for s in data["sets"]:
        ids, splits = [a[0] for a in s["assignments"]], [a[1] for a in s["assignments"]]
        probs = [cases[i]["yes_no_probabilities"] for i in ids]
        labels = [cases[i]["ground_truth_answer"] for i in ids]
        got = M.pope_prob_scores(probs, labels, splits)
        assert got.keys() == s["metrics"].keys()
        for key, want in s["metrics"].items():
            assert got[key] == pytest.approx(want, abs=1e-12), (s["set_id"], key)
        # The text-level view agrees on accuracy; its pooled value is the number the harness omits.
        preds = [cases[i]["predicted"] for i in ids]
        pooled = M.pope_scores(preds, labels)["accuracy"]
        assert pooled == pytest.approx(s["note_pooled_accuracy_NOT_reported_by_vlm_eval"], abs=1e-12)
        for split in M.POPE_SPLITS:
            sub = [(p, lab) for p, lab, sp in zip(preds, labels, splits, strict=True) if sp == split]
            acc = M.pope_scores([p for p, _ in sub], [lab for _, lab in sub])["accuracy"]
            assert acc == pytest.approx(s["metrics"][f"POPE-{split}-Accuracy"], abs=1e-12)


def test_vsr_tallyqa_ai2d(oracles):
    data = load(oracles, "prob_scorers.json")
    vsr = data["vsr"]
    got = M.vsr_prob_scores(
        [i["true_false_probabilities"] for i in vsr["items"]],
        [i["ground_truth_answer"] for i in vsr["items"]],
    )
    assert got == pytest.approx(vsr["metrics"], abs=1e-12)
    for key, name, order in (
        ("tallyqa", "TallyQA", ("simple", "complex")),
        ("ai2d", "AI2D", ("val", "test")),
    ):
        items = data[key]["items"]
        got = M.mc_prob_scores(
            [i["mc_probabilities"] for i in items],
            [i["ground_truth_answer"] for i in items],
            [i["split"] for i in items],
            name,
            order,
        )
        assert list(got) == list(data[key]["metrics"])
        assert got == pytest.approx(data[key]["metrics"], abs=1e-12), key


def test_undefined_auc_is_nan_not_an_error():
    out = M.pope_prob_scores([[0.9, 0.1], [0.7, 0.3]], ["yes", "yes"], ["random", "random"])
    assert out["POPE-random-Accuracy"] == 1.0 and math.isnan(out["POPE-random-AUCROC"])
    mc = M.mc_prob_scores([[0.6, 0.3, 0.1]] * 2, [0, 1], ["val", "val"], "AI2D")
    assert mc["accuracy__AI2D-val-Accuracy"] == 0.5 and math.isnan(mc["accuracy__AI2D-val-AUCROC"])


def test_roc_auc_and_ap_on_hand_cases():
    # Perfect ranking, a fully reversed one, and all-tied scores (AUC 1/2; AP = base rate).
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert M.roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    assert M.average_precision([0, 1, 0, 1], [0.5] * 4) == 0.5
    # Positives ranked 1st and 3rd: AP = (1/2)(1/1) + (1/2)(2/3).
    assert M.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 1 / 3)
    assert M.f1_binary([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5


# ----------------------------------------------------------------------------------------------
# Yes/no from text
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image", "no"),
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # the rule only knows "No", "no" and "not"
        ("Nope", "yes"),
        ("", "yes"),
    ],
)
def test_yes_no_from_text(text, expected):
    assert M.yes_no_from_text(text) == expected


def test_pope_scores_hand_counts():
    # TP=2, FP=1, FN=1, TN=1.
    out = M.pope_scores(["yes", "yes", "yes", "no", "no"], ["yes", "yes", "no", "yes", "no"])
    assert out == pytest.approx(
        {"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6}
    )
    assert M.pope_scores([True, False], [True, False])["accuracy"] == 1.0


# ----------------------------------------------------------------------------------------------
# Grounding
# ----------------------------------------------------------------------------------------------


def _expected_parse(case: dict):
    versions = case.get("parsed_by_python_version", {})
    here = f"{sys.version_info.major}.{sys.version_info.minor}."
    return next((v for k, v in versions.items() if k.startswith(here)), case["parsed"])


def test_refcoco_cases_and_sets(oracles):
    data = load(oracles, "refcoco.json")
    for c in data["cases"]:
        assert M.parse_box(c["generation"]) == _expected_parse(c), c["id"]
        st_ = M.grounding_status(c["generation"], c["gt_box"])
        # Exact float equality: the float_boundary cases sit one ulp off 0.5 (Q18).
        assert st_["iou"] == c["iou"], c["id"]
        assert (st_["status"] == "correct") == c["correct"], c["id"]
        assert (st_["box"] is None) == st_["status"].startswith("invalid") == (c["parsed"] is None), c["id"]
    cases = by_id(data["cases"])
    for s in data["sets"]:
        ids, names = [a[0] for a in s["case_split"]], [a[1] for a in s["case_split"]]
        got = M.refcoco_scores(
            [cases[i]["generation"] for i in ids], [cases[i]["gt_box"] for i in ids], names
        )
        assert got == s["metrics"], s["set_id"]


def test_ocidref_cases_and_set(oracles):
    data = load(oracles, "ocidref.json")
    assert data["iou_threshold"] == 0.25
    assert {int(k): v for k, v in data["get_split_table"].items()} == {
        t: M.ocid_clutter_split(t) for t in range(21)
    }
    for c in data["cases"]:
        assert M.parse_box(c["generation"]) == c["parsed"], c["id"]
        assert (M.grounding_status(c["generation"], c["gt_box"], 0.25)["status"] == "correct") == c["correct"]
        assert (M.grounding_status(c["generation"], c["gt_box"], 0.5)["status"] == "correct") == c[
            "correct_at_refcoco_0.5"
        ]
        assert M.ocid_clutter_split(c["take_id"]) == c["clutter_split"]
        pixels = c["gt_box_pixels_640x480"]
        if pixels is not None:  # some cases give the normalised box only
            assert [round(v / d, 2) for v, d in zip(pixels, (640, 480, 640, 480), strict=True)] == c["gt_box"]
    got = M.ocidref_scores(
        [c["generation"] for c in data["cases"]],
        [c["gt_box"] for c in data["cases"]],
        [c["clutter_split"] for c in data["cases"]],
    )
    assert got == data["set_metrics"]


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("[0.1, 0.2, 0.5, 0.6]", "correct"),
        ("[0.6, 0.7, 0.9, 0.9]", "wrong-location"),
        ("(0.1, 0.2, 0.5, 0.6)", "invalid-no-list"),
        ("The box is [0.1, 0.2, 0.5, 0.6].", "invalid-no-list"),
        ("[0.1, 0.2, 0.5]", "invalid-arity"),
        ("[64, 96, 320, 288]", "invalid-range"),
        ("['0.1', '0.2', '0.5', '0.6']", "invalid-range"),
        ("[0.5, 0.2, 0.1, 0.6]", "invalid-inverted"),
        ("[0.1, 0.2, 0.1, 0.6]", "invalid-inverted"),
    ],
)
def test_grounding_status_categories(text, status):
    out = M.grounding_status(text, [0.1, 0.2, 0.5, 0.6])
    assert out["status"] == status
    assert (out["box"] is None) == (out["iou"] is None) == status.startswith("invalid")


def test_grounding_report_hand_example():
    mean_box = [0.2, 0.2, 0.6, 0.6]
    statuses = [
        {"status": "correct", "box": [0.2, 0.2, 0.6, 0.6], "iou": 1.0},
        {"status": "wrong-location", "box": [0.25, 0.15, 0.65, 0.55], "iou": 0.35},
        {"status": "wrong-location", "box": [0.0, 0.0, 0.1, 0.1], "iou": 0.0},
        {"status": "invalid-range", "box": None, "iou": None},
    ]
    rep = M.grounding_report(statuses, mean_box=mean_box, near_thr=0.1)
    assert rep["n"] == 4 and rep["n_valid"] == 3
    assert rep["accuracy"] == 0.25 and rep["invalid_rate"] == 0.25
    assert rep["rates"]["wrong-location"] == 0.5 and rep["rates"]["invalid-arity"] == 0.0
    assert rep["near_mean_box_share"] == pytest.approx(2 / 3)  # the first two are within 0.1
    assert rep["iou_hist"]["counts"] == [1, 0, 0, 1, 0, 0, 0, 0, 0, 1]  # 1.0 falls in the last bin
    assert rep["iou_mean"] == pytest.approx(1.35 / 3)
    xs = [0.2, 0.25, 0.0]
    assert rep["box_variance"][0] == pytest.approx(sum((x - sum(xs) / 3) ** 2 for x in xs) / 3)
    collapsed = M.grounding_report([statuses[0]] * 5, mean_box=mean_box)
    assert collapsed["box_variance_total"] == 0.0 and collapsed["near_mean_box_share"] == 1.0
    assert M.grounding_report([])["n"] == 0


def test_box_iou_degenerate_boxes_do_not_divide_by_zero():
    assert M.box_iou([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]) == 0.0


# ----------------------------------------------------------------------------------------------
# Robustness: any generated text is scored without raising
# ----------------------------------------------------------------------------------------------

NASTY = [
    "",
    " ",
    "\ud800",
    "[\udfff, 0, 1, 1]",
    "\x00",
    "nan",
    "inf",
    "[nan, inf, -inf, 1]",
    "[1e999, 0, 1, 1]",
    "9" * 5000,
    "[" * 100_000,
    "[" * 50 + "]" * 50,
    "[[[[0.1]]]], [0.2]",
    "[0.1, 0.2, 0.5, 0.6]" * 2000,
    "yes. " * 20_000,
    "{}" * 1000,
    "1,000,000.5.5.5",
]

TEXT = st.text(
    st.one_of(
        st.characters(exclude_categories=()),
        st.characters(categories=["Cs"]),
        st.sampled_from(list("[](){},.;:'\"`-+0123456789eExnaif \n\t")),
    ),
    max_size=80,
)


def _score_everything(text: str) -> None:
    answers = ["yes", "two", "2", "Yes.", "yes", "no", "red-white", "don't", "a dog", "none"]
    for variant in ("official", "vlm-eval"):
        assert 0.0 <= M.vqa_accuracy(text, answers, variant) <= 1.0
        assert isinstance(M.normalize_answer(text, variant), str)
    assert 0.0 <= M.textvqa_accuracy(text, answers) <= 1.0
    assert 0.0 <= M.vizwiz_accuracy(text, answers) <= 1.0
    assert isinstance(M.gqa_correct(text, "yes"), bool)
    assert M.yes_no_from_text(text) in ("yes", "no")
    out = M.grounding_status(text, [0.1, 0.2, 0.5, 0.6])
    assert out["status"] in M.GROUNDING_STATUSES
    box = M.parse_box(text)
    if box is not None:
        assert len(box) == 4 and all(0 <= v <= 1 for v in box) and box[0] < box[2] and box[1] < box[3]
        assert out["status"] == ("correct" if out["iou"] >= 0.5 else "wrong-location")


@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_nasty_generations_are_scored(text):
    _score_everything(text)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_fuzzed_generations_are_scored(text):
    _score_everything(text)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=4, max_size=4),
    st.sampled_from(["[{}, {}, {}, {}]", "[{},{},{},{}]", "\n[{}, {}, {}, {},]\n", "[{}, {}, {}, {}] "]),
)
def test_box_text_round_trip(coords, fmt):
    x1, x2 = sorted(coords[::2])
    y1, y2 = sorted(coords[1::2])
    text = fmt.format(*(repr(v) for v in (x1, y1, x2, y2)))
    box = M.parse_box(text)
    if x1 < x2 and y1 < y2:
        assert box == [x1, y1, x2, y2]
        if (x2 - x1) * (y2 - y1) > 0:  # an area that underflows to 0 has no defined IoU
            assert M.grounding_status(text, box)["status"] == "correct"  # IoU with itself is 1
    else:
        assert box is None and M.grounding_status(text, [0, 0, 1, 1])["status"] == "invalid-inverted"
