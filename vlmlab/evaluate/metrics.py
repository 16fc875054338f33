"""Official-parity scorers for the study's benchmarks: VQA family, grounding and probability tasks.

Every rule here reproduces a reference implementation, quirks included, and is checked case by
case against the oracle data (../shared/oracles/metrics, see its README for each quirk Qn):

- official VQA accuracy: GT-Vision-Lab/VQA ``vqaEval.py`` at a013f00 (the oracle ran it on Python 2.7);
- vlm-evaluation (TRI-ML/vlm-evaluation at d9f5896, the harness the paper's release builds on):
  its VQAv2 copy (LAVIS-derived), TextVQA (EvalAI/M4C processor), VizWiz, GQA, POPE, RefCOCO*,
  OCID-Ref, VSR, TallyQA and AI2D scorers;
- ROC-AUC / average precision / F1 follow scikit-learn's definitions (1.5-1.7), re-implemented in
  numpy so the package does not depend on scikit-learn.

Set-level scorers return the dict the harness's ``*Scorer.score()`` returns (same keys, same
rounding: VQAv2 / VizWiz / GQA in rounded percent, the others as unrounded fractions).
Scoring never raises on generated text: empty, huge, surrogate or bracket-soup outputs are just
wrong (or invalid, for boxes).
"""

from __future__ import annotations

import ast
import math
import re
import string
from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np

# ----------------------------------------------------------------------------------------------
# Tables (facts of vqaEval.py a013f00; identical copies in vlm-evaluation's vqav2 and textvqa code)
# ----------------------------------------------------------------------------------------------

# Deleted or replaced by a space; apostrophe, colon, # $ % & * ^ | ~ are NOT in the list (Q4).
PUNCTUATION_MARKS: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# 120 entries; keys are matched against lower-cased tokens, so the 4 capitalised keys never match
# (Q6) and "somebody'd" maps backwards to "somebodyd". Kept verbatim for parity.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip


def _vizwiz_contractions() -> dict[str, str]:
    """VizWiz evaluator's table: the same 120 entries written with backticks (Q13).

    Keys swap ' for ` except two; values swap except 8 entries that keep the apostrophe
    (facts of vlm-evaluation vlm_eval/util/evaluation/vizwiz/eval.py, checked against the oracle table).
    """
    keep_key = {"couldn'tve", "hadn'tve"}
    keep_value = {"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"}
    return {
        (k if k in keep_key else k.replace("'", "`")): (v if k in keep_value else v.replace("'", "`"))
        for k, v in CONTRACTIONS.items()
    }


VIZWIZ_CONTRACTIONS: dict[str, str] = _vizwiz_contractions()

# Python 2 vs 3 (Q11): the official numbers come from Python 2.7, where `\d` is ASCII-only (the
# pattern has no UNICODE flag) and u"İ".lower() is "i". vlm-evaluation runs on Python 3, where
# `\d` is any Unicode decimal digit and "İ".lower() is "i̇". Both behaviours are kept, by name.
_COMMA_BETWEEN_DIGITS = {True: re.compile(r"\d,\d", re.ASCII), False: re.compile(r"\d,\d")}
# The official pattern is "(?!<=\d)(\.)(?!\d)": the first group is a look-AHEAD for "<=digit",
# which can never match before a ".", so only "not followed by a digit" is effective (Q1).
_PERIOD_NOT_BEFORE_DIGIT = {True: re.compile(r"\.(?!\d)", re.ASCII), False: re.compile(r"\.(?!\d)")}
# re.UNICODE (= 32) is passed positionally into `sub`, where it lands in `count` (Q2).
_PERIOD_COUNT = 32
_GQA_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean_whitespace(text: str) -> str:
    """Newlines and tabs become spaces, then the ends are stripped (first step of every VQA scorer)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str, python2: bool = True) -> str:
    """The VQA punctuation step, then the period rule.

    For each mark, every occurrence is deleted when the mark touches a space somewhere in the input,
    or when the input contains digit,digit anywhere (then all marks are deleted, Q3); otherwise each
    occurrence becomes one space. Conditions are tested on the input, not the partly processed text.

    Args:
        text: the string to process.
        python2: official semantics (ASCII digits); False gives vlm-evaluation's Python 3 ones.
    """
    comma_rule = _COMMA_BETWEEN_DIGITS[python2].search(text) is not None
    out = text
    for mark in PUNCTUATION_MARKS:
        delete = comma_rule or (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if delete else " ")
    return _PERIOD_NOT_BEFORE_DIGIT[python2].sub("", out, count=_PERIOD_COUNT)


def process_digit_article(
    text: str, contractions: Mapping[str, str] = CONTRACTIONS, python2: bool = True
) -> str:
    """Lower-case, split on whitespace, map number words, drop articles, expand contractions, re-join."""
    if python2:
        # Python 2 lower-cases with simple case mappings: U+0130 becomes a plain "i". (Its older
        # Unicode 5.2 tables are not emulated: letters cased only since then lower-case here.)
        text = text.replace("\u0130", "i")
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(contractions.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str, variant: str = "official") -> str:
    """The official VQA normalisation of a prediction: whitespace, punctuation, digits/articles/contractions.

    Args:
        text: raw answer text.
        variant: "official" (GT-Vision-Lab code as run under Python 2.7) or "vlm-eval" (the same
            steps under Python 3, as vlm-evaluation's VQAv2 scorer applies them to predictions).
    """
    python2 = _check_variant(variant) == "official"
    return process_digit_article(process_punctuation(clean_whitespace(text), python2), python2=python2)


def normalize_textvqa(text: str) -> str:
    """EvalAI/M4C answer processor used by vlm-evaluation's TextVQA scorer (Q10)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    # Its own comma-between-digits trigger can never fire: every comma is already gone.
    text = process_punctuation(clean_whitespace(text), python2=False)
    return process_digit_article(text, python2=False)


def normalize_vizwiz(text: str) -> str:
    """VizWiz evaluator's prediction normalisation: the VQA steps with the backtick contraction table."""
    text = process_punctuation(clean_whitespace(text), python2=False)
    return process_digit_article(text, VIZWIZ_CONTRACTIONS, python2=False)


def normalize_gqa(text: str) -> str:
    """GQA harness: delete every ASCII punctuation character, lower-case; no strip, nothing else (Q15)."""
    return text.translate(_GQA_PUNCTUATION).lower()


def _check_variant(variant: str) -> str:
    if variant not in ("official", "vlm-eval"):
        raise ValueError(f"unknown VQA variant {variant!r}; expected 'official' or 'vlm-eval'")
    return variant


# ----------------------------------------------------------------------------------------------
# VQA-family accuracy
# ----------------------------------------------------------------------------------------------


def leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Average over the leave-one-out subsets of min(1, #matches / 3), summed in answer order.

    Exclusion is by position (the official files give each answer its own id, Q21); the order of the
    sum matters for bit-identical values such as 0.8999999999999998 (Q9).
    """
    if len(answers) == 0:
        raise ValueError("VQA accuracy needs at least one reference answer")
    hits = [a == prediction for a in answers]
    total = sum(hits)
    terms = [min(1.0, (total - hit) / 3) for hit in hits]
    return sum(terms) / len(terms)


def vqa_accuracy(prediction: str, answers: Sequence[str], variant: str = "official") -> float:
    """Per-question VQA accuracy in [0, 1].

    Args:
        prediction: the generated answer.
        answers: the human answers (10 in VQAv2).
        variant: "official": both sides whitespace-cleaned; if the answers are not all identical,
            both sides are fully normalised, else compared raw (Q7). "vlm-eval": the prediction is
            always normalised, the answers only get the punctuation step (Q8).
    """
    if _check_variant(variant) == "official":
        answers = [clean_whitespace(a) for a in answers]
        prediction = clean_whitespace(prediction)
        if len(set(answers)) > 1:
            answers = [normalize_answer(a) for a in answers]
            prediction = normalize_answer(prediction)
        return leave_one_out_accuracy(prediction, answers)
    answers = [process_punctuation(a, python2=False) for a in answers]
    return leave_one_out_accuracy(normalize_answer(prediction, "vlm-eval"), answers)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA soft score: the leave-one-out formula on EvalAI-processed strings, both sides."""
    if len(answers) != 10:  # the scorer asserts exactly 10 answers
        raise ValueError(f"TextVQA scoring needs exactly 10 answers, got {len(answers)}")
    return leave_one_out_accuracy(normalize_textvqa(prediction), [normalize_textvqa(a) for a in answers])


def vizwiz_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VizWiz accuracy: normalised prediction against the RAW human answers (Q12)."""
    return leave_one_out_accuracy(normalize_vizwiz(prediction), list(answers))


def gqa_correct(prediction: str, gold: str) -> bool:
    """GQA exact match of the processed prediction against the unprocessed gold answer."""
    return normalize_gqa(prediction) == gold


def _mean_percent(values: Sequence[float], variant: str = "official") -> float:
    # vqaEval.py: round(100*float(sum)/len, 2); vlm-evaluation's VQAv2: round(100*(sum/len), 2).
    if variant == "official":
        return round(100 * float(sum(values)) / len(values), 2)
    return round(100 * (sum(values) / len(values)), 2)


def vqa_scores(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    variant: str = "official",
    answer_types: Sequence[str] | None = None,
    question_types: Sequence[str] | None = None,
) -> dict:
    """Set-level VQA accuracy in percent rounded to 2 decimals, overall and per answer/question type."""
    accs = [vqa_accuracy(p, a, variant) for p, a in zip(predictions, answers, strict=True)]
    out: dict = {"accuracy": _mean_percent(accs, variant)}
    by_type = {"accuracy-by-answer-type": answer_types, "accuracy-by-question-type": question_types}
    for key, types in by_type.items():
        if types is not None:
            groups: dict[str, list[float]] = {}
            for t, acc in zip(types, accs, strict=True):
                groups.setdefault(t, []).append(acc)
            out[key] = {t: _mean_percent(v, variant) for t, v in groups.items()}
    return out


def textvqa_scores(
    outputs_ocr: Sequence[str], outputs_pure: Sequence[str], answers: Sequence[Sequence[str]]
) -> dict[str, float]:
    """TextVQAScorer: unrounded mean soft score with the OCR-token prompt and without it ("Pure")."""
    ocr = [textvqa_accuracy(p, a) for p, a in zip(outputs_ocr, answers, strict=True)]
    pure = [textvqa_accuracy(p, a) for p, a in zip(outputs_pure, answers, strict=True)]
    return {"accuracy__TextVQA-OCR": sum(ocr) / len(ocr), "accuracy__TextVQA-Pure": sum(pure) / len(pure)}


def vizwiz_scores(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], answerable: Sequence[int]
) -> dict[str, float]:
    """VizWizScorer: accuracy overall / answerable / unanswerable, plus unanswerability AP and F1 (percent).

    The model says "unanswerable" iff its normalised answer is exactly "unanswerable" (Q14); the
    AP is computed from that binary score, so it is not a ranking metric. Like the harness, an
    empty answerable or unanswerable group raises ZeroDivisionError.
    """
    accs = [vizwiz_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)]
    said_unanswerable = [int(normalize_vizwiz(p) == "unanswerable") for p in predictions]
    is_unanswerable = [1 - int(a) for a in answerable]
    pairs = list(zip(accs, is_unanswerable, strict=True))
    avg_pr = average_precision(is_unanswerable, said_unanswerable)
    return {
        "accuracy__VizWiz-Overall": _mean_percent(accs),
        "accuracy__VizWiz-Answerable": _mean_percent([x for x, u in pairs if not u]),
        "accuracy__VizWiz-Unanswerable": _mean_percent([x for x, u in pairs if u]),
        "accuracy__VizWiz-Unanswerable-AvgPR": round(100 * avg_pr, 2),
        "accuracy__VizWiz-Unanswerable-F1": round(100 * f1_binary(is_unanswerable, said_unanswerable), 2),
    }


def gqa_scores(
    predictions: Sequence[str], golds: Sequence[str], structural_types: Sequence[str] | None = None
) -> dict[str, float]:
    """GQAScorer: accuracy in percent as the official eval.py prints it ("{:.2f}") and the harness reads back.

    Args:
        predictions: generated answers.
        golds: gold answers (all testdev-balanced questions count).
        structural_types: optional GQA structural type per question; when given, "binary" and
            "open" are added ("open" iff the type is "query", as eval.py does).
    """
    correct = [float(gqa_correct(p, g)) for p, g in zip(predictions, golds, strict=True)]

    def percent(xs: list[float]) -> float:
        return float(f"{(float(sum(xs)) / len(xs) if xs else 0) * 100:.2f}")

    out = {"accuracy": percent(correct)}
    if structural_types is not None:
        is_open = [t == "query" for t in structural_types]
        out["binary"] = percent([c for c, o in zip(correct, is_open, strict=True) if not o])
        out["open"] = percent([c for c, o in zip(correct, is_open, strict=True) if o])
    return out


# ----------------------------------------------------------------------------------------------
# Grounding (RefCOCO / RefCOCO+ / RefCOCOg, OCID-Ref, the toy referring task)
# ----------------------------------------------------------------------------------------------

GROUNDING_STATUSES: tuple[str, ...] = (
    "correct", "wrong-location", "invalid-no-list", "invalid-arity", "invalid-range", "invalid-inverted",
)  # fmt: skip


def _parse_box_status(text: str) -> tuple[list[float] | None, str]:
    """The harness's parse_bbox rules, also telling which rule failed."""
    try:
        # Python's literal parser, exactly as the harness: booleans, hex and 1e-1 are numbers (Q18);
        # leading blanks are accepted on Python >= 3.10. Any failure (syntax, null byte, surrogate,
        # nesting depth, huge int) means "not a list".
        value = ast.literal_eval(text)
    except Exception:
        return None, "invalid-no-list"
    if not isinstance(value, list):  # a tuple, set or dict is rejected
        return None, "invalid-no-list"
    if len(value) != 4:
        return None, "invalid-arity"
    try:
        in_range = all(0 <= v <= 1 for v in value)
    except TypeError:  # a string, None, nested list or complex number cannot be compared
        in_range = False
    if not in_range:
        return None, "invalid-range"
    if not (value[0] < value[2] and value[1] < value[3]):
        return None, "invalid-inverted"
    return [float(v) for v in value], "ok"


def parse_box(text: str) -> list[float] | None:
    """Normalised xyxy box from a generation, or None where the harness would call it invalid.

    Valid iff the whole text is a Python list literal of 4 numbers in [0, 1] with x1 < x2 and
    y1 < y2; any text around the list (even a trailing period) makes it invalid.
    """
    return _parse_box_status(text)[0]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes, in the harness's float64 operation order (it decides ties at 0.5, Q18)."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    inter = max(0, ix2 - ix1) * max(0, iy2 - iy1)
    union = area_a + area_b - inter
    # Two degenerate boxes (a GT rounded to zero width) would divide by zero; they share no area.
    return inter / union if union > 0 else 0.0


def grounding_status(text: str, gt_box_normalized: Sequence[float], thr: float = 0.5) -> dict:
    """Scores one grounding generation: dict(status, box, iou).

    status is "correct" (IoU >= thr), "wrong-location", or why the box is invalid ("invalid-no-list",
    "invalid-arity", "invalid-range", "invalid-inverted"); invalid counts as wrong, reported apart.
    box and iou are None for invalid outputs.
    """
    box, status = _parse_box_status(text)
    if box is None:
        return {"status": status, "box": None, "iou": None}
    iou = box_iou(box, gt_box_normalized)
    return {"status": "correct" if iou >= thr else "wrong-location", "box": box, "iou": iou}


def refcoco_scores(
    generations: Sequence[str], gt_boxes: Sequence[Sequence[float]], datasets: Sequence[str], thr: float = 0.5
) -> dict[str, float]:
    """RefCOCOScorer: Acc@0.5 per dataset (RefCOCO, RefCOCO+, RefCOCOg), invalid outputs count as wrong."""
    correct: dict[str, list[bool]] = {}
    for text, gt, name in zip(generations, gt_boxes, datasets, strict=True):
        correct.setdefault(name, []).append(grounding_status(text, gt, thr)["status"] == "correct")
    return {f"accuracy__{name}": sum(c) / len(c) for name, c in correct.items()}


OCID_CLUTTER_SPLITS: tuple[str, ...] = ("Minimum Clutter", "Medium Clutter", "Maximum Clutter")


def ocid_clutter_split(take_id: int) -> str:
    """OCID-Ref clutter split of a take: 0-9 minimum, 10-16 medium, 17-20 maximum."""
    return OCID_CLUTTER_SPLITS[0 if take_id <= 9 else 1 if take_id <= 16 else 2]


def ocidref_scores(
    generations: Sequence[str], gt_boxes: Sequence[Sequence[float]], clutter: Sequence[str], thr: float = 0.25
) -> dict[str, float]:
    """OCIDRefScorer: Acc@0.25 (sic, Q19) per clutter split and pooled ("All")."""
    correct: dict[str, list[bool]] = {s: [] for s in OCID_CLUTTER_SPLITS}
    for text, gt, split in zip(generations, gt_boxes, clutter, strict=True):
        correct[split].append(grounding_status(text, gt, thr)["status"] == "correct")
    out = {f"accuracy__OCIDRef-{s.split()[0]}": sum(c) / len(c) for s, c in correct.items() if c}
    pooled = [x for c in correct.values() for x in c]
    out["accuracy__OCIDRef-All"] = sum(pooled) / len(pooled)
    return out


def grounding_report(
    statuses: Sequence[Mapping],
    mean_box: Sequence[float] | None = None,
    near_thr: float = 0.1,
    bins: int = 10,
) -> dict:
    """Summary of grounding_status results, with signals of a localization collapse.

    Args:
        statuses: outputs of grounding_status.
        mean_box: the dataset's mean GT box (normalised xyxy); a model that always answers near it
            has collapsed to a prior rather than localizing.
        near_thr: a box is "near" the mean box when all 4 coordinates are within this distance.
        bins: number of equal-width IoU bins over [0, 1].

    Returns:
        dict with n; accuracy (correct / n, invalid in the denominator like the harness); the rate
        of each status and invalid_rate; over VALID boxes only: n_valid, iou_mean, iou_hist (edges,
        counts; 1.0 falls in the last bin), near_mean_box_share (None without mean_box), box_variance
        (per coordinate) and box_variance_total (their sum; about 0 for a collapsed model).
    """
    n = len(statuses)
    counts = {s: 0 for s in GROUNDING_STATUSES}
    for s in statuses:
        counts[s["status"]] += 1
    boxes = np.array([s["box"] for s in statuses if s["box"] is not None], dtype=np.float64).reshape(-1, 4)
    ious = np.array([s["iou"] for s in statuses if s["box"] is not None], dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    near = None
    if mean_box is not None and len(boxes):
        offsets = np.abs(boxes - np.asarray(mean_box, dtype=np.float64))
        near = float(np.all(offsets <= near_thr, axis=1).mean())
    variance = boxes.var(axis=0) if len(boxes) else np.full(4, np.nan)
    return {
        "n": n,
        "accuracy": counts["correct"] / n if n else math.nan,
        "rates": {s: (c / n if n else math.nan) for s, c in counts.items()},
        "invalid_rate": (sum(c for s, c in counts.items() if s.startswith("invalid")) / n) if n else math.nan,
        "n_valid": len(boxes),
        "iou_mean": float(ious.mean()) if len(ious) else math.nan,
        "iou_hist": {"edges": edges.tolist(), "counts": np.histogram(ious, bins=edges)[0].tolist()},
        "near_mean_box_share": near,
        "box_variance": variance.tolist(),
        "box_variance_total": float(variance.sum()),
    }


# ----------------------------------------------------------------------------------------------
# Ranking metrics, scikit-learn's definitions (roc_auc_score, average_precision_score, f1_score)
# ----------------------------------------------------------------------------------------------


def _binary_clf_curve(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False / true positive counts at each distinct score threshold, highest threshold first."""
    order = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[order], y_true[order]
    last_of_each = np.r_[np.where(np.diff(y_score))[0], y_true.size - 1]
    tps = np.cumsum(y_true, dtype=np.float64)[last_of_each]
    fps = 1 + last_of_each - tps
    return fps, tps


def roc_auc(y_true: Sequence[int], y_score: Sequence[float]) -> float:
    """Area under the ROC curve (trapezoids, ties handled as scikit-learn does); nan with one class."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if len(np.unique(y_true)) != 2:
        return math.nan  # scikit-learn raises here; an undefined AUC is reported as nan instead
    fps, tps = _binary_clf_curve(y_true, y_score)
    if len(fps) > 2:  # drop collinear points (drop_intermediate=True) for the same float sums
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps = fps[keep], tps[keep]
    fpr = np.r_[0, fps] / fps[-1]
    tpr = np.r_[0, tps] / tps[-1]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def average_precision(y_true: Sequence[int], y_score: Sequence[float]) -> float:
    """Average precision: sum over thresholds of (R_k - R_{k-1}) * P_k, no interpolation."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    fps, tps = _binary_clf_curve(y_true, y_score)
    predicted = tps + fps
    precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted != 0)
    recall = np.ones_like(tps) if tps[-1] == 0 else tps / tps[-1]
    precision = np.r_[precision[::-1], 1.0]
    recall = np.r_[recall[::-1], 0.0]
    return max(0.0, float(-np.sum(np.diff(recall) * precision[:-1])))


def f1_binary(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """F1 of the positive class, 2TP / (2TP + FP + FN); 0 where undefined."""
    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    denom = t.sum() + p.sum()
    return float(2 * np.sum(t & p) / denom) if denom else 0.0


def _multiclass_auc_ap(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Macro one-vs-one ROC-AUC and macro one-vs-rest AP; nan unless every class occurs."""
    n_classes = probs.shape[1]
    if len(np.unique(labels)) != n_classes:
        # The harness raises ("Number of classes in y_true not equal to the number of columns").
        return math.nan, math.nan
    pair_scores = []
    for a, b in combinations(range(n_classes), 2):
        mask = (labels == a) | (labels == b)
        auc_a = roc_auc(labels[mask] == a, probs[mask, a])
        auc_b = roc_auc(labels[mask] == b, probs[mask, b])
        pair_scores.append((auc_a + auc_b) / 2)
    ap = np.array([average_precision(labels == c, probs[:, c]) for c in range(n_classes)])
    return float(np.mean(np.array(pair_scores))), float(np.mean(ap))


# ----------------------------------------------------------------------------------------------
# Probability-scored tasks: POPE, VSR, TallyQA, AI2D (no generated text is parsed, Q16)
# ----------------------------------------------------------------------------------------------

POPE_SPLITS: tuple[str, ...] = ("adversarial", "popular", "random")


def argmax_first(probs: Sequence[float]) -> int:
    """Index of the largest probability, the first one on a tie (np.argmax)."""
    return int(np.argmax(np.asarray(probs, dtype=np.float64)))


def _by_split(splits: Sequence[str], order: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(splits))
    return [s for s in order if s in present] + [s for s in present if s not in order]


def pope_prob_scores(
    yes_no_probs: Sequence[Sequence[float]], labels: Sequence[str], splits: Sequence[str]
) -> dict[str, float]:
    """PopeScorer from the renormalised first-token probabilities of "Yes" and "No".

    Per split: Accuracy (argmax, a tie is "yes"), AUCROC and AUCPR of P(yes). final-Accuracy is the
    UNWEIGHTED mean of the split accuracies; final AUCs pool all examples. Only the plain keys are
    returned (the harness repeats each with an "accuracy__" prefix).
    """
    yes = np.array([p[0] for p in yes_no_probs], dtype=np.float64)
    is_yes = np.array([lab == "yes" for lab in labels])
    predicted_yes = np.array([argmax_first(p) == 0 for p in yes_no_probs])
    split_arr = np.asarray(splits)
    out, accs = {}, []
    for split in _by_split(splits, POPE_SPLITS):
        m = split_arr == split
        accs.append(float(np.sum(predicted_yes[m] == is_yes[m]) / np.sum(m)))
        out[f"POPE-{split}-Accuracy"] = accs[-1]
        out[f"POPE-{split}-AUCROC"] = roc_auc(is_yes[m], yes[m])
        out[f"POPE-{split}-AUCPR"] = average_precision(is_yes[m], yes[m])
    out["POPE-final-Accuracy"] = float(np.mean(accs))
    out["POPE-final-AUCROC"] = roc_auc(is_yes, yes)
    out["POPE-final-AUCPR"] = average_precision(is_yes, yes)
    return out


def vsr_prob_scores(true_false_probs: Sequence[Sequence[float]], labels: Sequence[bool]) -> dict[str, float]:
    """VSRScorer: exact match of argmax over ["True", "False"], with ROC-AUC and AP of P(True)."""
    p_true = [p[0] for p in true_false_probs]
    is_true = [lab is True for lab in labels]
    correct = sum((argmax_first(p) == 0) == t for p, t in zip(true_false_probs, is_true, strict=True))
    auc, ap = roc_auc(is_true, p_true), average_precision(is_true, p_true)
    return {
        "accuracy__VSR-ExactMatch": float(correct / len(labels)),
        "accuracy__VSR-AUCROC": auc,
        "accuracy__VSR-AUCPR": ap,
        "auc-roc": auc,
        "auc-pr": ap,
    }


def mc_prob_scores(
    probs: Sequence[Sequence[float]],
    labels: Sequence[int],
    splits: Sequence[str],
    name: str,
    split_order: Sequence[str] = (),
) -> dict[str, float]:
    """TallyQA / AI2D scorers: argmax over the option letters; accuracy, OvO ROC-AUC and macro AP.

    Args:
        probs: renormalised probabilities of the letters (A-P for TallyQA counts 0-15, A-D for AI2D).
        labels: index of the correct option.
        splits: split of each item ("simple"/"complex" for TallyQA, "val"/"test" for AI2D).
        name: "TallyQA" or "AI2D" (the key prefix).
        split_order: key order; splits not listed follow in order of appearance.

    AUCs are nan for a split that lacks one of the classes (the harness raises there, Q20).
    Final accuracy is pooled, unlike POPE.
    """
    probs_arr = np.asarray(probs, dtype=np.float64)
    labels_arr = np.asarray(labels)
    split_arr = np.asarray(splits)
    correct = probs_arr.argmax(axis=1) == labels_arr
    out = {}
    for split in [*_by_split(splits, split_order), "final"]:
        m = split_arr == split if split != "final" else np.ones(len(labels_arr), dtype=bool)
        auc, ap = _multiclass_auc_ap(labels_arr[m], probs_arr[m])
        out[f"accuracy__{name}-{split}-Accuracy"] = float(np.sum(correct[m]) / np.sum(m))
        out[f"accuracy__{name}-{split}-AUCROC"] = auc
        out[f"accuracy__{name}-{split}-AUCPR"] = ap
    return out


# ----------------------------------------------------------------------------------------------
# Yes/no from generated text (POPE as scored by the POPE / LLaVA scripts, not by vlm-evaluation)
# ----------------------------------------------------------------------------------------------


def yes_no_from_text(text: str) -> str:
    """Yes/no read from text: "no" iff the first sentence has the word "no", "No" or "not".

    The rule of the POPE repository's and LLaVA's eval_pope scripts: keep the text before the first
    ".", delete commas, split on single spaces. It never abstains: anything else counts as "yes".
    """
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(predictions: Sequence[str | bool], labels: Sequence[str | bool]) -> dict[str, float]:
    """POPE paper metrics with "yes" as the positive class: accuracy, precision, recall, F1, yes-ratio.

    Args:
        predictions: "yes"/"no" (e.g. from yes_no_from_text, or decided from probabilities) or bools.
        labels: "yes"/"no" or bools.
    """
    pred = np.array([p if isinstance(p, bool | np.bool_) else p == "yes" for p in predictions], dtype=bool)
    gold = np.array([g if isinstance(g, bool | np.bool_) else g == "yes" for g in labels], dtype=bool)
    if len(pred) != len(gold) or len(pred) == 0:
        raise ValueError("pope_scores needs equally many predictions and labels, at least one")
    tp, fp = int(np.sum(pred & gold)), int(np.sum(pred & ~gold))
    fn, tn = int(np.sum(~pred & gold)), int(np.sum(~pred & ~gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(pred),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(pred),
    }
