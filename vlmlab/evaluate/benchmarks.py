"""Benchmark registry: what each evaluation asks, how it is scored, and how large the harness's sets are.

Facts come from TRI-ML/vlm-evaluation (d9f5896): prompts from the Prismatic wrapper's prompt
functions, scorers from vlm_eval/tasks/harnesses/*, set sizes from the index builders (slim
subsets are the first k ids, or the first k per split, of a seed-21 shuffle). The paper's release
evaluates through that harness; the oracle README (../shared/oracles/metrics) lists the same facts.

Prompt templates here are the user message WITHOUT the image: the harness's Prismatic wrapper
prefixes it with "\\n" (LLaVA puts "<image>" there), while our model inserts visual tokens right
after BOS, so the chat template (vlmlab.vlm.prompts) owns that position. HARNESS_MESSAGE_PREFIX
gives the byte-identical harness message when needed.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

HARNESS_MESSAGE_PREFIX = "\n"
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
GROUNDING_PROMPT = 'Please provide the bounding box coordinate of the region this sentence describes: "{ref}"'
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
OCR_TOKENS_MARKER = "\nReference OCR token:"


@dataclass(frozen=True)
class Benchmark:
    """One evaluation: prompt template, scorer and set sizes.

    Args:
        name: registry id (the names presets use).
        group: "vqa" or "loc" (which weighted score it enters).
        prompt: user-message template; fields are filled from the item dict ({question}, {ref},
            {caption}; {choices} is rendered as "A. ...\\nB. ..." lines).
        metric: scorer in vlmlab.evaluate.metrics: "vqa-accuracy", "gqa-accuracy", "vizwiz-accuracy",
            "textvqa-accuracy", "acc@iou", "pope-probabilities", "vsr-probabilities", "mc-probabilities".
        splits: splits (or sub-datasets) the harness reports separately.
        slim_size: items of the harness's slim subset (per split when slim_per_split); None: no slim set.
        slim_per_split: whether slim_size counts per split.
        full_size: items of the full evaluation set, where the builder asserts it.
        iou_threshold: correctness threshold of grounding benchmarks.
        answer_strings: for probability-scored benchmarks, the strings whose first-token
            probabilities are compared (renormalised over these); None: score generated text.
        choices: fixed answer options (TallyQA's counts); items may carry their own "choices".
        drop_ocr_tokens: cut the question at the OCR-token line (TextVQA "Pure").
    """

    name: str
    group: Literal["vqa", "loc"]
    prompt: str
    metric: str
    splits: tuple[str, ...] = ("val",)
    slim_size: int | None = None
    slim_per_split: bool = False
    full_size: int | None = None
    iou_threshold: float | None = None
    answer_strings: tuple[str, ...] | None = None
    choices: tuple[str, ...] | None = None
    drop_ocr_tokens: bool = False
    fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(f for _, f, _, _ in string.Formatter().parse(self.prompt) if f)
        object.__setattr__(self, "fields", names)
        if self.group not in ("vqa", "loc"):
            raise ValueError(f"{self.name}: group must be 'vqa' or 'loc', not {self.group!r}")
        if (self.group == "loc") != (self.iou_threshold is not None):
            raise ValueError(f"{self.name}: grounding benchmarks (and only they) need an iou_threshold")

    @property
    def scoring(self) -> Literal["generate", "probabilities"]:
        """How items are scored: from next-token probabilities, or from generated text."""
        return "probabilities" if self.answer_strings else "generate"

    @property
    def slim_total(self) -> int | None:
        """Items in the slim subset over all splits (the full set where there is no slim subset)."""
        if self.slim_size is None:
            return self.full_size
        return self.slim_size * (len(self.splits) if self.slim_per_split else 1)


TALLY_COUNTS = tuple(str(i) for i in range(16))  # letters A-P stand for counts 0-15
LETTERS = tuple(string.ascii_uppercase)

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
            "vqa-v2", "vqa", "{question}" + SHORT_ANSWER, "vqa-accuracy", slim_size=1024, full_size=214354
        ),
        Benchmark(
            "gqa",
            "vqa",
            "{question}" + SHORT_ANSWER,
            "gqa-accuracy",
            splits=("testdev_balanced",),
            slim_size=1024,
            full_size=12578,
        ),
        Benchmark(
            "vizwiz",
            "vqa",
            "{question}\nWhen the provided information is insufficient, respond with 'Unanswerable'."
            + SHORT_ANSWER,
            "vizwiz-accuracy",
            slim_size=1024,
            full_size=4319,
        ),
        # {question} is LLaVA's preprocessed text: the question, then a "Reference OCR token: ..." line.
        Benchmark(
            "textvqa-ocr",
            "vqa",
            "{question}" + SHORT_ANSWER,
            "textvqa-accuracy",
            slim_size=1024,
            full_size=5000,
        ),
        Benchmark(
            "textvqa-pure",
            "vqa",
            "{question}" + SHORT_ANSWER,
            "textvqa-accuracy",
            slim_size=1024,
            full_size=5000,
            drop_ocr_tokens=True,
        ),
        # The builder asserts 3000 + 3000 + 2910 = 8910 items although the config says 9000 (Q17).
        Benchmark(
            "pope",
            "vqa",
            "{question}" + SHORT_ANSWER,
            "pope-probabilities",
            splits=("adversarial", "popular", "random"),
            slim_size=1024,
            slim_per_split=True,
            full_size=8910,
            answer_strings=("Yes", "No"),
        ),
        Benchmark(
            "vsr",
            "vqa",
            'Based on the image, is this statement "True" or "False"? {caption}'
            '\nRespond with "True" or "False" directly.',
            "vsr-probabilities",
            splits=("zeroshot-test",),
            full_size=1222,
            answer_strings=("True", "False"),
        ),
        Benchmark(
            "tally-qa",
            "vqa",
            "{question}\n{choices}" + MC_SUFFIX,
            "mc-probabilities",
            splits=("simple", "complex"),
            slim_size=1024,
            slim_per_split=True,
            full_size=38589,
            answer_strings=LETTERS[:16],
            choices=TALLY_COUNTS,
        ),
        Benchmark(
            "ai2d",
            "vqa",
            "{question}\n{choices}" + MC_SUFFIX,
            "mc-probabilities",
            splits=("val", "test"),
            slim_size=1024,
            slim_per_split=True,
            full_size=15501,
            answer_strings=LETTERS[:4],
        ),
        # RefCOCO* val: 26488 sentences over the three datasets (per-dataset totals not asserted).
        Benchmark("refcoco", "loc", GROUNDING_PROMPT, "acc@iou", slim_size=1024, iou_threshold=0.5),
        Benchmark("refcoco+", "loc", GROUNDING_PROMPT, "acc@iou", slim_size=1024, iou_threshold=0.5),
        Benchmark("refcocog", "loc", GROUNDING_PROMPT, "acc@iou", slim_size=1024, iou_threshold=0.5),
        # IoU >= 0.25, not 0.5: the harness credits the OCID-Ref paper for it (Q19).
        Benchmark(
            "ocid-ref",
            "loc",
            GROUNDING_PROMPT,
            "acc@iou",
            splits=("minimum", "medium", "maximum"),
            slim_size=1024,
            slim_per_split=True,
            full_size=18342,
            iou_threshold=0.25,
        ),
        # The toy world's analogues (generated; sizes set by the preset).
        Benchmark("toy-vqa", "vqa", "{question}" + SHORT_ANSWER, "vqa-accuracy", splits=("test",)),
        Benchmark("toy-ref", "loc", GROUNDING_PROMPT, "acc@iou", splits=("test",), iou_threshold=0.5),
    ]
}

ALIASES: dict[str, str] = {
    "vqav2": "vqa-v2", "textvqa": "textvqa-ocr", "tallyqa": "tally-qa", "ocidref": "ocid-ref",
}  # fmt: skip


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark called `name` (or one of its aliases)."""
    key = ALIASES.get(name, name)
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


def list_benchmarks(group: str | None = None) -> list[str]:
    """Registered names, optionally only one group ("vqa" or "loc")."""
    return [n for n, b in BENCHMARKS.items() if group is None or b.group == group]


def format_choices(choices: tuple[str, ...] | list[str]) -> str:
    """Options as lettered lines ("A. first", "B. second", ...), as the harness's MC prompt writes them."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} choices but only {len(LETTERS)} letters")
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def build_prompt(bench: Benchmark | str, item: Mapping) -> str:
    """The user message for one item (without the image).

    Args:
        bench: a Benchmark or its name.
        item: the item's fields, e.g. {"question": ...}, {"ref": ...}, {"caption": ...};
            multiple-choice items give "choices" (TallyQA falls back to the counts 0-15).
    """
    bench = get_benchmark(bench) if isinstance(bench, str) else bench
    values = dict(item)
    if bench.drop_ocr_tokens and "question" in values:
        values["question"] = values["question"].split(OCR_TOKENS_MARKER)[0]
    if "choices" in bench.fields:
        choices = values.get("choices") or bench.choices
        if choices is None:
            raise KeyError(f"{bench.name}: the item needs 'choices'")
        values["choices"] = format_choices(choices)
    missing = [f for f in bench.fields if f not in values]
    if missing:
        raise KeyError(f"{bench.name}: the item lacks {missing} (its prompt uses {list(bench.fields)})")
    return bench.prompt.format_map(values)
