"""Converters of the paper's real data (official files) to the unified schema; slim subsets; downloads.

One function per dataset reads the official files where they lie and returns a `Conversion`: the
unified records of `vlmlab.data.schema`, in the public harness's order, plus every input record
that was skipped, with its reason. `write_conversion` writes them with the toy world's layout:

    <out>/eval/<benchmark>.jsonl      EvalItem; benchmark names of vlmlab.evaluate.benchmarks
    <out>/train/llava.json            TrainRecord (llava_v1_5_mix665k.json, blip_laion_cc_sbu_558k.json)
    <out>/images/<dataset>/...        the images: a symlink to the image folder (default) or copies
    <out>/manifests/<name>.json       sources, counts in / out / skipped, each skip with its reason

Image paths in records are relative to the output root: "images/<dataset>/" + the path the official
file gives relative to its image folder (e.g. images/vqav2/COCO_val2014_000000000042.jpg). Boxes are
(x1, y1, x2, y2) in original pixels (COCO's xywh converted); `image_size` is read from the image
header (PIL, no decoding), as the harness's RefCOCO builder does, so it is the size of the file the
model reads; with `check="exists"` it falls back to the size the annotation states, if any.

Order and slim subsets. Facts from TRI-ML/vlm-evaluation (d9f5896, vlm_eval/tasks/harnesses/*.py;
also the oracle README, "Subsets"): each builder inserts examples in the official files' order (for
RefCOCO*: RefCOCO, RefCOCO+, RefCOCOg val refs in refs-file order, one example per sentence; POPE:
adversarial, popular, random), shuffles the id list once with random.Random(21), and its slim-k
subset is the first k ids, or the first k per split, of that order. We shuffle positions instead of
ids, which is the same permutation for the same count, and write records in that order, so
`slim_records` (first k per benchmark, or per benchmark and split) reproduces the harness's subset
whenever no record is skipped. A skipped bad record keeps its place in the shuffle, so the others
keep their relative order; a duplicate id takes no place (the harness's dict index collapses it).
AI2D is the exception: its builder lists question files with os.listdir, whose order depends on the
filesystem; we sort the files by image id, so our AI2D order and slim subset are our own.
LLaVA training records keep their file order.

Bad input. A record with a missing or unreadable image, a box with x2 <= x1 or y2 <= y1 or outside
its image, a missing or ill-typed field, or an id seen before raises `DataError` naming the file,
the record (index in the file, and id) and the reason; with `skip_bad=True` it is skipped and listed
in `Conversion.skipped`. A JSON file cut mid-way cannot be read at all and always raises (naming
the file and the position); in a JSON-lines file a cut line is one bad record. Well-formed records
the schema cannot hold (LLaVA's text-only conversations) are always skipped and listed as
"excluded". Every conversion satisfies: records in = records out + skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from random import Random
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ValidationError
from tqdm.auto import tqdm

from vlmlab.data.schema import (
    DataError,
    EvalItem,
    TrainRecord,
    load_eval,
    load_train,
    write_json,
    write_jsonl,
)
from vlmlab.evaluate.benchmarks import LETTERS, get_benchmark

HARNESS_SEED = 21  # default seed of the harness's scripts/datasets/prepare.py and every builder
CHECKS = ("header", "decode", "exists")

# ---- outcome of a conversion ---------------------------------------------------------------------


@dataclass(frozen=True)
class Skip:
    """One input record that did not become a unified record, and why.

    Args:
        path: the official file it came from.
        index: its position in that file (0-based; for RefCOCO* the sentence's position among the
            split's sentences), None for a whole-file problem.
        record_id: its id where it has one.
        reason: what was wrong.
        excluded: True for a well-formed record the schema cannot hold (not bad input).
    """

    path: str
    index: int | None
    record_id: str | None
    reason: str
    excluded: bool = False

    def __str__(self) -> str:
        where = self.path
        if self.index is not None:
            where += f": record {self.index}"
        if self.record_id is not None:
            where += f" (id {self.record_id!r})"
        return f"{where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "index": self.index,
            "id": self.record_id,
            "reason": self.reason,
            "excluded": self.excluded,
        }


@dataclass
class Conversion:
    """What a converter made of the official files.

    Args:
        name: dataset name (also the manifest's name), e.g. "vqav2", "textvqa-ocr", "llava".
        kind: "eval" (EvalItem records) or "train" (TrainRecord records).
        records: unified records in the harness's order (train: file order).
        skipped: input records that did not become records.
        n_in: input records considered (those of the converted split).
        sources: the official files read.
        images: where the images are and how records name them.
        renamed: "old id -> new id" for duplicates renamed instead of skipped.
    """

    name: str
    kind: Literal["eval", "train"]
    records: list[Any]
    skipped: list[Skip]
    n_in: int
    sources: list[str]
    images: ImageStore
    renamed: list[str] = field(default_factory=list)

    @property
    def n_out(self) -> int:
        return len(self.records)

    @property
    def benchmarks(self) -> list[str]:
        """Benchmarks of the records, in order of first appearance (eval only)."""
        return list(dict.fromkeys(r.benchmark for r in self.records)) if self.kind == "eval" else []

    def counts(self) -> dict[str, Any]:
        bad = sum(not s.excluded for s in self.skipped)
        out = {"in": self.n_in, "out": self.n_out, "skipped": len(self.skipped), "bad": bad}
        out["excluded"] = len(self.skipped) - bad
        if self.kind == "eval":
            out["benchmarks"] = dict(Counter(r.benchmark for r in self.records))
        return out


class _Bad(Exception):
    """A record-level problem; the driver turns it into a DataError or a Skip."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason, self.field = reason, field


class _Excluded(Exception):
    """A well-formed record the unified schema cannot hold."""


@dataclass
class _Row:
    """One input record: where it is, and how to build its unified record."""

    path: Path
    index: int | None
    rid: str | None
    build: Callable[[], BaseModel]


def _rid(raw: Any, key: str) -> str | None:
    v = raw.get(key) if isinstance(raw, dict) else None
    return None if v is None else str(v)


def _pydantic_reason(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if loc:
        return f"field {loc!r}: {msg}", loc
    return msg, (msg.split("'")[1] if msg.startswith("field '") else None)


def _run(
    name: str,
    kind: Literal["eval", "train"],
    rows: Sequence[_Row],
    images: ImageStore,
    sources: Iterable[str | Path],
    skip_bad: bool,
    shuffle: bool = True,
    rename_duplicates: bool = False,
) -> Conversion:
    """Builds every row in input order (so errors come in file order), then puts them in harness order."""
    built: list[tuple[int, Any]] = []
    skipped: list[Skip] = []
    renamed: list[str] = []
    seen: dict[tuple[str, str], int | None] = {}
    position = 0  # place in the harness's shuffle; duplicates get none

    def bad(row: _Row, reason: str, fld: str | None) -> None:
        skip = Skip(str(row.path), row.index, row.rid, reason)
        if not skip_bad:
            raise DataError(
                f"{skip} (skip_bad / --skip-bad skips such records)", row.path, row.index, row.rid, fld
            )
        skipped.append(skip)

    for row in rows:
        try:
            rec = row.build()
        except _Excluded as e:
            skipped.append(Skip(str(row.path), row.index, row.rid, str(e), excluded=True))
            position += 1
            continue
        except _Bad as e:
            bad(row, e.reason, e.field)
            position += 1
            continue
        except ValidationError as e:
            bad(row, *_pydantic_reason(e))
            position += 1
            continue
        key = (getattr(rec, "benchmark", ""), rec.id)
        if key in seen:
            if not rename_duplicates:
                bad(row, f"duplicate id {rec.id!r} (first at record {seen[key]})", "id")
                continue
            k = 2
            while (key[0], f"{rec.id}#{k}") in seen:
                k += 1
            renamed.append(f"{rec.id} -> {rec.id}#{k} ({row.path}: record {row.index})")
            rec = rec.model_copy(update={"id": f"{rec.id}#{k}"})
            key = (key[0], rec.id)
        seen[key] = row.index
        built.append((position, rec))
        position += 1

    records = [rec for _, rec in built]
    if shuffle:
        rank = {p: r for r, p in enumerate(harness_permutation(position))}
        records = [rec for _, rec in sorted(built, key=lambda pr: rank[pr[0]])]
    n_in = len(rows)
    conv = Conversion(name, kind, records, skipped, n_in, [str(s) for s in sources], images, renamed)
    assert conv.n_in == conv.n_out + len(conv.skipped), "records in != out + skipped"
    return conv


# ---- order and slim subsets ----------------------------------------------------------------------


def harness_permutation(n: int, seed: int = HARNESS_SEED) -> list[int]:
    """Insertion positions in the harness's order: `Random(seed).shuffle` of a list of n ids.

    `random.shuffle` draws only from the list's length, so shuffling positions gives the same
    permutation the harness applies to its ids.
    """
    order = list(range(n))
    Random(seed).shuffle(order)
    return order


def slim_records(
    records: Sequence[EvalItem], sizes: Mapping[str, int | None] | None = None
) -> list[EvalItem]:
    """The harness's slim subset: the first k records of each benchmark (per split where it counts so).

    Records must be in the harness's order (as converters and converted files give them). k and
    "per split" come from the benchmark registry (vlmlab.evaluate.benchmarks: slim_size,
    slim_per_split); a benchmark without a slim set (VSR, toy ones) keeps every record.

    Args:
        records: evaluation items in harness order.
        sizes: optional override of k per benchmark name (None: keep all of that benchmark).
    """
    taken: Counter[tuple[str, str]] = Counter()
    out = []
    for r in records:
        bench = get_benchmark(r.benchmark)
        k = sizes[r.benchmark] if sizes is not None and r.benchmark in sizes else bench.slim_size
        if k is None:
            out.append(r)
            continue
        key = (r.benchmark, r.split if bench.slim_per_split else "")
        if taken[key] < k:
            taken[key] += 1
            out.append(r)
    return out


# ---- reading official files ----------------------------------------------------------------------


class _Object(dict):
    """A JSON object that remembers all its (key, value) pairs when a key repeats."""

    pairs: list[tuple[str, Any]] | None = None


def _object_with_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    for k, v in pairs:
        if k in obj:
            obj.pairs = pairs  # json.loads would silently keep one of them
        else:
            obj[k] = v
    return obj


def read_json(path: str | os.PathLike, keep_duplicate_keys: bool = False) -> Any:
    """Reads a JSON file; a missing, unreadable or cut file raises DataError naming it and the position.

    Args:
        path: the file.
        keep_duplicate_keys: objects whose keys repeat keep all their pairs in `.pairs` (for files
            keyed by example id, where a repeated key is a duplicate record, not a silent overwrite).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}", path=path) from e
    try:
        return json.loads(text, object_pairs_hook=_object_with_pairs if keep_duplicate_keys else None)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}"
            + (" - the file looks cut mid-way" if e.pos >= len(text.rstrip()) - 1 else ""),
            path=path,
        ) from e


def _items(obj: Mapping) -> list[tuple[str, Any]]:
    pairs = getattr(obj, "pairs", None)
    return list(pairs) if pairs is not None else list(obj.items())


def _json_lines(path: Path) -> list[tuple[Any, str | None]]:
    """(value, error) per non-empty line of a JSON-lines file; a bad line is one bad record, not the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}", path=path) from e
    if text.lstrip().startswith("["):  # some copies are a JSON list rather than one object per line
        data = read_json(path)
        return [(v, None) for v in data] if isinstance(data, list) else [(data, None)]
    out: list[tuple[Any, str | None]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), None))
        except json.JSONDecodeError as e:
            out.append((None, f"line {lineno}: invalid JSON at column {e.colno}: {e.msg}"))
    return out


def _expect(data: Any, kind: type, path: Path, what: str) -> Any:
    if not isinstance(data, kind):
        raise DataError(f"{path}: expected {what}, got {type(data).__name__}", path=path)
    return data


def _list_in(data: Any, key: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected a JSON object with a {key!r} list", path=path)
    return data[key]


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "an object",
    bool: "a boolean",
}


def _req(raw: Any, key: str, *types: type) -> Any:
    """raw[key], which must be present, not null, and of one of `types` (bool is not an int here)."""
    if not isinstance(raw, dict):
        raise _Bad(f"expected a JSON object, got {type(raw).__name__}")
    if raw.get(key) is None:
        raise _Bad(f"field {key!r} is missing", key)
    v = raw[key]
    if types and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
        want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise _Bad(f"field {key!r}: expected {want}, got {type(v).__name__} {str(v)[:40]!r}", key)
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """COCO's [x, y, width, height] as [x1, y1, x2, y2]."""
    x, y, w, h = box
    return [x, y, x + w, y + h]


def _box(value: Any, size: tuple[int, int] | None, key: str = "bbox", xywh: bool = False) -> list[float]:
    """A box field as [x1, y1, x2, y2] floats, checked: ordered corners and inside the image (when known)."""
    if not isinstance(value, list | tuple) or len(value) != 4 or not all(_is_number(v) for v in value):
        raise _Bad(f"field {key!r}: a box is 4 finite numbers, got {str(value)[:60]}", key)
    box = [float(v) for v in (xywh_to_xyxy(value) if xywh else value)]
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        raise _Bad(f"field {key!r}: box {box} needs x1 < x2 and y1 < y2", key)
    if size is not None:
        w, h = size
        if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
            raise _Bad(f"field {key!r}: box {box} is outside the {w}x{h} image", key)
    return box


# ---- images --------------------------------------------------------------------------------------


class ImageStore:
    """Where a dataset's images are on disk, how records name them, and their checked sizes.

    Args:
        root: the image folder the official files' paths are relative to.
        prefix: what records put before those paths (relative to the output root), e.g. "images/vqav2";
            "" when the images already lie under the output root (e.g. a toy world).
        check: "header" (default: the file exists and PIL reads its header: size, format), "decode"
            (the whole image decodes: catches truncated files, slower) or "exists" (only existence;
            sizes then come from the annotation where it gives them).
    """

    def __init__(self, root: str | os.PathLike, prefix: str, check: str = "header"):
        if check not in CHECKS:
            raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
        self.root, self.prefix, self.check = Path(root), prefix.strip("/"), check
        self._sizes: dict[str, tuple[int, int] | None | _Bad] = {}
        self.used: dict[str, str] = {}  # record path -> path relative to root, for copying

    def image(self, rel: Any, stated: tuple[int, int] | None = None) -> tuple[str, tuple[int, int] | None]:
        """(record path, (width, height)) of the official relative path `rel`, checked as configured.

        The path must stay inside the image folder. `stated` is the annotation's size, used where
        the image is not measured (check="exists").
        """
        if not isinstance(rel, str) or not rel.strip():
            raise _Bad(f"image path must be a non-empty string, got {rel!r}", "image")
        p = PurePosixPath(rel.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts:
            raise _Bad(f"image path {rel!r} leaves the image folder", "image")
        key = str(p)
        if key not in self._sizes:
            self._sizes[key] = self._measure(key)
        got = self._sizes[key]
        if isinstance(got, _Bad):  # a fresh exception per record: one bad image may serve many
            raise _Bad(got.reason, got.field)
        record = f"{self.prefix}/{key}" if self.prefix else key
        self.used[record] = key
        return record, (got if got is not None else stated)

    def _measure(self, rel: str) -> tuple[int, int] | None | _Bad:
        path = self.root / rel
        if not path.is_file():
            return _Bad(f"image {path} not found", "image")
        if self.check == "exists":
            return None
        try:
            with Image.open(path) as im:
                if self.check == "decode":
                    im.load()
                return im.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            return _Bad(f"cannot read image {path}: {type(e).__name__}: {e}", "image")


def _store(images: str | os.PathLike | ImageStore, dataset: str) -> ImageStore:
    return images if isinstance(images, ImageStore) else ImageStore(images, f"images/{dataset}")


def _size_list(size: tuple[int, int] | None) -> list[int] | None:
    return [int(size[0]), int(size[1])] if size is not None else None


def _stated_size(raw: Any, wkey: str = "width", hkey: str = "height") -> tuple[int, int] | None:
    if isinstance(raw, dict) and _is_number(raw.get(wkey)) and _is_number(raw.get(hkey)):
        return int(raw[wkey]), int(raw[hkey])
    return None


# ---- VQA-style benchmarks ------------------------------------------------------------------------


def convert_vqav2(
    questions: str | os.PathLike,
    annotations: str | os.PathLike,
    images: str | os.PathLike | ImageStore,
    *,
    skip_bad: bool = False,
    rename_duplicates: bool = False,
) -> Conversion:
    """VQAv2 val (v2_OpenEnded_mscoco_val2014_questions.json + v2_mscoco_val2014_annotations.json).

    One item per annotation (the harness's order), all 10 answers; image COCO_<data_subtype>_<id:012d>.jpg
    in `images` (the val2014 folder). metadata: qtype (the official question_type), answer_type,
    multiple_choice_answer.
    """
    questions, annotations, store = Path(questions), Path(annotations), _store(images, "vqav2")
    qdata, adata = read_json(questions), read_json(annotations)
    by_qid: dict[Any, dict] = {}
    for q in _list_in(qdata, "questions", questions):
        if isinstance(q, dict) and q.get("question_id") is not None:
            by_qid.setdefault(q["question_id"], q)
    subtype = adata.get("data_subtype", "val2014") if isinstance(adata, dict) else "val2014"

    def build(ann: Any) -> EvalItem:
        qid, image_id = _req(ann, "question_id", int), _req(ann, "image_id", int)
        if qid not in by_qid:
            raise _Bad(f"question_id {qid} has no question in {questions}", "question_id")
        answers = [_req(a, "answer", str) for a in _req(ann, "answers", list)]
        image, size = store.image(f"COCO_{subtype}_{image_id:012d}.jpg")
        meta = {k: ann.get(k) for k in ("question_type", "answer_type", "multiple_choice_answer")}
        return EvalItem(
            id=str(qid),
            image=image,
            benchmark="vqa-v2",
            split="val",
            question=_req(by_qid[qid], "question", str),
            answers=answers,
            image_size=_size_list(size),
            metadata={"qtype": meta.pop("question_type"), **{k: v for k, v in meta.items() if v is not None}},
        )

    anns = _list_in(adata, "annotations", annotations)
    rows = [_Row(annotations, i, _rid(a, "question_id"), partial(build, a)) for i, a in enumerate(anns)]
    return _run(
        "vqav2", "eval", rows, store, [questions, annotations], skip_bad, rename_duplicates=rename_duplicates
    )


def convert_gqa(
    questions: str | os.PathLike,
    images: str | os.PathLike | ImageStore,
    *,
    skip_bad: bool = False,
    rename_duplicates: bool = False,
) -> Conversion:
    """GQA testdev-balanced (testdev_balanced_questions.json: {question id: question}); image <imageId>.jpg.

    answers = [the single gold answer]; metadata: qtype (types.structural), semantic, detailed,
    full_answer.
    """
    questions, store = Path(questions), _store(images, "gqa")
    data = _expect(
        read_json(questions, keep_duplicate_keys=True), dict, questions, "an object {question id: question}"
    )

    def build(qid: str, ex: Any) -> EvalItem:
        image, size = store.image(f"{_req(ex, 'imageId', str)}.jpg")
        types = ex.get("types") if isinstance(ex.get("types"), dict) else {}
        meta = {
            "qtype": types.get("structural"),
            "semantic": types.get("semantic"),
            "detailed": types.get("detailed"),
            "full_answer": ex.get("fullAnswer"),
        }
        return EvalItem(
            id=qid,
            image=image,
            benchmark="gqa",
            split="testdev_balanced",
            question=_req(ex, "question", str),
            answers=[_req(ex, "answer", str)],
            image_size=_size_list(size),
            metadata={k: v for k, v in meta.items() if v is not None},
        )

    rows = [_Row(questions, i, qid, partial(build, qid, ex)) for i, (qid, ex) in enumerate(_items(data))]
    return _run("gqa", "eval", rows, store, [questions], skip_bad, rename_duplicates=rename_duplicates)


def convert_vizwiz(
    annotations: str | os.PathLike,
    images: str | os.PathLike | ImageStore,
    *,
    skip_bad: bool = False,
    rename_duplicates: bool = False,
) -> Conversion:
    """VizWiz val (val.json: a list of {image, question, answers[10], answerable, answer_type}).

    id = the image name without extension (one question per image); metadata: answerable (0/1, the
    scorer's split), qtype (answer_type).
    """
    annotations, store = Path(annotations), _store(images, "vizwiz")
    data = _expect(read_json(annotations), list, annotations, "a JSON list of questions")

    def build(ex: Any) -> EvalItem:
        rel = _req(ex, "image", str)
        image, size = store.image(rel)
        answerable = _req(ex, "answerable", int)
        if answerable not in (0, 1):
            raise _Bad(f"field 'answerable' must be 0 or 1, got {answerable}", "answerable")
        meta = {"answerable": answerable}
        if isinstance(ex.get("answer_type"), str):
            meta["qtype"] = ex["answer_type"]
        return EvalItem(
            id=PurePosixPath(rel).stem,
            image=image,
            benchmark="vizwiz",
            split="val",
            question=_req(ex, "question", str),
            answers=[_req(a, "answer", str) for a in _req(ex, "answers", list)],
            image_size=_size_list(size),
            metadata=meta,
        )

    rows = [_Row(annotations, i, _rid(ex, "image"), partial(build, ex)) for i, ex in enumerate(data)]
    return _run("vizwiz", "eval", rows, store, [annotations], skip_bad, rename_duplicates=rename_duplicates)


def convert_textvqa(
    annotations: str | os.PathLike,
    images: str | os.PathLike | ImageStore,
    ocr_questions: str | os.PathLike | None = None,
    *,
    benchmark: str = "textvqa-ocr",
    skip_bad: bool = False,
    rename_duplicates: bool = False,
) -> Conversion:
    """TextVQA val (TextVQA_0.5.1_val.json {"data": [...]}, images <image_id>.jpg in train_images/).

    The harness's question text is LLaVA's preprocessed one (textvqa_val_v051_ocr.jsonl: the question,
    then a "Reference OCR token: ..." line), taken verbatim; "textvqa-pure" prompts cut it at that
    line (vlmlab.evaluate.benchmarks). We pair the two files by question_id (the harness pairs them by
    position and asserts equal lengths: the same pairing when the files agree). Without the OCR file
    only "textvqa-pure" can be made, from the plain questions.

    Args:
        annotations: TextVQA_0.5.1_val.json.
        images: the train_images folder (or an ImageStore).
        ocr_questions: LLaVA's textvqa_val_v051_ocr.jsonl.
        benchmark: "textvqa-ocr" or "textvqa-pure" (same items; the prompt differs).
    """
    if benchmark not in ("textvqa-ocr", "textvqa-pure"):
        raise ValueError(f"benchmark must be 'textvqa-ocr' or 'textvqa-pure', got {benchmark!r}")
    if benchmark == "textvqa-ocr" and ocr_questions is None:
        raise ValueError("textvqa-ocr needs LLaVA's OCR question file (textvqa_val_v051_ocr.jsonl)")
    annotations, store = Path(annotations), _store(images, "textvqa")
    data = _list_in(read_json(annotations), "data", annotations)
    sources: list[Path] = [annotations]
    ocr: dict[Any, str] = {}
    if ocr_questions is not None:
        ocr_path = Path(ocr_questions)
        sources.append(ocr_path)
        for value, _ in _json_lines(ocr_path):  # a bad line shows up as a question without OCR text
            if isinstance(value, dict) and isinstance(value.get("text"), str):
                ocr.setdefault(value.get("question_id"), value["text"])

    def build(ex: Any) -> EvalItem:
        qid, question = _req(ex, "question_id", int), _req(ex, "question", str)
        rel = f"{_req(ex, 'image_id', str)}.jpg"
        image, size = store.image(rel, _stated_size(ex, "image_width", "image_height"))
        meta: dict[str, Any] = {}
        if ocr_questions is not None:
            if qid not in ocr:
                raise _Bad(f"question_id {qid} has no OCR question in {sources[1]}", "question_id")
            meta["plain_question"], question = question, ocr[qid]
        return EvalItem(
            id=str(qid),
            image=image,
            benchmark=benchmark,
            split="val",
            question=question,
            answers=_str_list(ex, "answers"),
            image_size=_size_list(size),
            metadata=meta,
        )

    rows = [_Row(annotations, i, _rid(ex, "question_id"), partial(build, ex)) for i, ex in enumerate(data)]
    return _run(benchmark, "eval", rows, store, sources, skip_bad, rename_duplicates=rename_duplicates)


def _str_list(raw: Any, key: str) -> list[str]:
    """raw[key] as a list of strings."""
    values = _req(raw, key, list)
    for v in values:
        if not isinstance(v, str):
            raise _Bad(f"field {key!r}: expected strings, got {type(v).__name__} {str(v)[:40]!r}", key)
    return values


POPE_SPLITS = ("adversarial", "popular", "random")  # the harness's insertion order


def convert_pope(
    adversarial: str | os.PathLike,
    popular: str | os.PathLike,
    random: str | os.PathLike,
    images: str | os.PathLike | ImageStore,
    *,
    skip_bad: bool = False,
    rename_duplicates: bool = False,
) -> Conversion:
    """POPE on COCO (coco_pope_{adversarial,popular,random}.json: one JSON object per line).

    Question ids repeat across splits, so id = "<split>-<question_id>"; answers = [label] ("yes"/"no").
    """
    store = _store(images, "pope")
    paths = dict(zip(POPE_SPLITS, (Path(adversarial), Path(popular), Path(random)), strict=True))

    def build(split: str, ex: Any, err: str | None) -> EvalItem:
        if err is not None:
            raise _Bad(err)
        label = _req(ex, "label", str)
        if label not in ("yes", "no"):
            raise _Bad(f"field 'label' must be 'yes' or 'no', got {label!r}", "label")
        image, size = store.image(_req(ex, "image", str))
        return EvalItem(
            id=f"{split}-{_req(ex, 'question_id', int, str)}",
            image=image,
            benchmark="pope",
            split=split,
            question=_req(ex, "text", str),
            answers=[label],
            image_size=_size_list(size),
            metadata={"question_id": ex["question_id"]},
        )

    rows = []
    for split, path in paths.items():
        for i, (ex, err) in enumerate(_json_lines(path)):
            rid = None if err else f"{split}-{ex.get('question_id')}" if isinstance(ex, dict) else None
            rows.append(_Row(path, i, rid, partial(build, split, ex, err)))
    return _run("pope", "eval", rows, store, paths.values(), skip_bad, rename_duplicates=rename_duplicates)


def convert_vsr(
    questions: str | os.PathLike,
    images: str | os.PathLike | ImageStore,
    *,
    skip_bad: bool = False,
    rename_duplicates: bool = False,
) -> Conversion:
    """VSR zero-shot test (test.jsonl: {image, caption, label 0/1, relation, subj, obj, ...} per line).

    id = the line's index (the harness's example id); question = the caption (the VSR prompt's
    {caption}; also in metadata["caption"]); answers = ["True"] or ["False"]; metadata qtype = relation.
    """
    questions, store = Path(questions), _store(images, "vsr")

    def build(i: int, ex: Any, err: str | None) -> EvalItem:
        if err is not None:
            raise _Bad(err)
        label = _req(ex, "label", int)
        if label not in (0, 1):
            raise _Bad(f"field 'label' must be 0 or 1, got {label}", "label")
        caption = _req(ex, "caption", str)
        image, size = store.image(_req(ex, "image", str))
        meta = {"caption": caption, **{k: ex[k] for k in ("subj", "obj") if isinstance(ex.get(k), str)}}
        if isinstance(ex.get("relation"), str):
            meta["qtype"] = ex["relation"]
        return EvalItem(
            id=str(i),
            image=image,
            benchmark="vsr",
            split="zeroshot-test",
            question=caption,
            answers=["True" if label == 1 else "False"],
            image_size=_size_list(size),
            metadata=meta,
        )

    lines = _json_lines(questions)
    rows = [_Row(questions, i, str(i), partial(build, i, ex, err)) for i, (ex, err) in enumerate(lines)]
    return _run("vsr", "eval", rows, store, [questions], skip_bad, rename_duplicates=rename_duplicates)


def convert_tallyqa(
    questions: str | os.PathLike,
    images: str | os.PathLike | ImageStore,
    *,
    skip_bad: bool = False,
    rename_duplicates: bool = False,
) -> Conversion:
    """TallyQA test (test.json: a list of {image, question, answer, question_id, issimple, ...}).

    split = "simple" / "complex" (issimple); the harness asks a 16-way multiple choice (A-P = counts
    0-15), so answers = [letter of the count]; metadata: answer_index (the count), data_source.
    """
    questions, store = Path(questions), _store(images, "tallyqa")
    data = _expect(read_json(questions), list, questions, "a JSON list of questions")

    def build(ex: Any) -> EvalItem:
        count, simple = _req(ex, "answer", int), _req(ex, "issimple", bool)
        image, size = store.image(_req(ex, "image", str))
        if not 0 <= count <= 15:
            raise _Bad(f"field 'answer': count {count} is not one of the 16 choices 0-15", "answer")
        meta = {"answer_index": count}
        if isinstance(ex.get("data_source"), str):
            meta["data_source"] = ex["data_source"]
        return EvalItem(
            id=str(_req(ex, "question_id", int)),
            image=image,
            benchmark="tally-qa",
            split="simple" if simple else "complex",
            question=_req(ex, "question", str),
            answers=[LETTERS[count]],
            image_size=_size_list(size),
            metadata=meta,
        )

    rows = [_Row(questions, i, _rid(ex, "question_id"), partial(build, ex)) for i, ex in enumerate(data)]
    return _run("tallyqa", "eval", rows, store, [questions], skip_bad, rename_duplicates=rename_duplicates)


def _ai2d_file_key(path: Path) -> tuple[int, str]:
    head = path.name.split(".")[0]
    return (int(head), path.name) if head.isdigit() else (sys.maxsize, path.name)


def convert_ai2d(
    questions_dir: str | os.PathLike,
    test_ids: str | os.PathLike,
    images: str | os.PathLike | ImageStore,
    *,
    skip_bad: bool = False,
    rename_duplicates: bool = False,
) -> Conversion:
    """AI2D (ai2d/questions/<image>.json: {imageName, questions: {text: {answerTexts, correctAnswer,
    questionId, abcLabel}}}) with ai2d_test_ids.csv deciding split "test" (else "val").

    Files are read in image-id order (the harness's os.listdir order is filesystem-dependent);
    id = questionId; answers = [letter of correctAnswer]; metadata: choices, answer_index, abc_label.
    """
    questions_dir, test_ids, store = Path(questions_dir), Path(test_ids), _store(images, "ai2d")
    if not questions_dir.is_dir():
        raise DataError(f"{questions_dir}: not a folder of AI2D question files", path=questions_dir)
    try:
        with open(test_ids, newline="", encoding="utf-8") as f:
            test = {int(row[0]) for row in csv.reader(f) if row and row[0].strip().isdigit()}
    except OSError as e:
        raise DataError(f"{test_ids}: cannot read: {e}", path=test_ids) from e

    def build(path: Path, image_name: Any, text: str, q: Any) -> EvalItem:
        choices = _str_list(q, "answerTexts")
        if not 1 <= len(choices) <= 4:
            raise _Bad(f"field 'answerTexts': the harness asks with letters A-D, got {len(choices)} choices")
        correct = _req(q, "correctAnswer", int)
        if not 0 <= correct < len(choices):
            raise _Bad(f"field 'correctAnswer': {correct} is not an index of the {len(choices)} choices")
        if not isinstance(image_name, str):
            raise _Bad(f"{path.name}: field 'imageName' is missing or not a string", "imageName")
        image, size = store.image(image_name)
        image_id = _ai2d_file_key(path)[0]
        meta = {"choices": choices, "answer_index": correct}
        if isinstance(q.get("abcLabel"), bool):
            meta["abc_label"] = q["abcLabel"]
        return EvalItem(
            id=_req(q, "questionId", str),
            image=image,
            benchmark="ai2d",
            split="test" if image_id in test else "val",
            question=text,
            answers=[LETTERS[correct]],
            image_size=_size_list(size),
            metadata=meta,
        )

    rows, sources = [], [test_ids]
    for path in sorted(questions_dir.glob("*.json"), key=_ai2d_file_key):
        sources.append(path)
        data = read_json(path, keep_duplicate_keys=True)
        if not isinstance(data, dict) or not isinstance(data.get("questions"), dict):
            raise DataError(f"{path}: expected an object with a 'questions' object", path=path)
        for i, (text, q) in enumerate(_items(data["questions"])):
            rows.append(
                _Row(path, i, _rid(q, "questionId"), partial(build, path, data.get("imageName"), text, q))
            )
    return _run("ai2d", "eval", rows, store, sources, skip_bad, rename_duplicates=rename_duplicates)


# ---- grounding benchmarks ------------------------------------------------------------------------

# refer's datasets as the harness loads them (refcoco.py: REFER(..., splitBy=...)) and their names
REFER_DATASETS: dict[str, tuple[str, str, str]] = {
    "refcoco": ("unc", "refcoco", "RefCOCO"),
    "refcoco+": ("unc", "refcoco+", "RefCOCO+"),
    "refcocog": ("umd", "refcocog", "RefCOCOg"),
}  # folder name -> (splitBy, benchmark, harness name)


def _load_refs(path: Path) -> list:
    from vlmlab.encoders.checkpoints import CheckpointError, safe_unpickle

    if not path.is_file():
        raise DataError(f"{path}: no such refs file", path=path)
    try:
        refs = safe_unpickle(path)  # plain data only: never arbitrary pickle
    except CheckpointError as e:
        raise DataError(f"{path}: cannot read refs: {e}", path=path) from e
    return _expect(refs, list, path, "a list of refs")


def _fail(reason: str) -> EvalItem:
    raise _Bad(reason)


def _refer_item(
    ref: dict,
    sent: Any,
    *,
    store: ImageStore,
    anns: dict,
    imgs: dict,
    bench: str,
    split: str,
    refer_name: str,
) -> EvalItem:
    """One sentence of a refer ref: the referred annotation's COCO xywh box as pixel xyxy."""
    ref_id, ann_id = _req(ref, "ref_id", int), _req(ref, "ann_id", int)
    image_id, sent_id = _req(ref, "image_id", int), _req(sent, "sent_id", int)
    if ann_id not in anns:
        raise _Bad(f"ann_id {ann_id} of ref {ref_id} is not in instances.json", "ann_id")
    image, size = store.image(f"COCO_train2014_{image_id:012d}.jpg", _stated_size(imgs.get(image_id)))
    meta = {"ref_id": ref_id, "sent_id": sent_id, "ann_id": ann_id, "refer_dataset": refer_name}
    if isinstance(ref.get("category_id"), int):
        meta["category_id"] = ref["category_id"]
    return EvalItem(
        id=f"{ref_id}-{sent_id}",
        image=image,
        benchmark=bench,
        split=split,
        ref=_req(sent, "sent", str),
        box=_box(_req(anns[ann_id], "bbox", list), size, xywh=True),
        image_size=_size_list(size),
        metadata=meta,
    )


def convert_refcoco(
    refer_root: str | os.PathLike,
    images: str | os.PathLike | ImageStore,
    *,
    datasets: Sequence[str] = ("refcoco", "refcoco+", "refcocog"),
    split: str = "val",
    split_by: Mapping[str, str] | None = None,
    skip_bad: bool = False,
    rename_duplicates: bool = False,
) -> Conversion:
    """RefCOCO / RefCOCO+ / RefCOCOg from refer's <refer_root>/<dataset>/refs(<splitBy>).p + instances.json.

    One item per sentence of each `split` ref, id "<ref_id>-<sent_id>", box = the referred
    annotation's COCO xywh box as pixel xyxy; image COCO_train2014_<image_id:012d>.jpg (the harness's
    path). The three datasets are shuffled together as the harness does, so converting all three at
    once is what reproduces its slim subsets.

    Args:
        refer_root: folder holding refcoco/, refcoco+/, refcocog/.
        images: the COCO train2014 folder (or an ImageStore).
        datasets: which of them, in the harness's order.
        split: refs split to convert ("val" for the paper).
        split_by: override of the refs file per dataset (harness: unc, unc, umd).
    """
    refer_root, store = Path(refer_root), _store(images, "refcoco")
    rows, sources = [], []
    for ds in datasets:
        if ds not in REFER_DATASETS:
            raise ValueError(f"unknown refer dataset {ds!r}; known: {', '.join(REFER_DATASETS)}")
        default_by, bench, harness_name = REFER_DATASETS[ds]
        by = (split_by or {}).get(ds, default_by)
        refs_path, inst_path = refer_root / ds / f"refs({by}).p", refer_root / ds / "instances.json"
        refs, instances = _load_refs(refs_path), read_json(inst_path)
        anns = {a.get("id"): a for a in _list_in(instances, "annotations", inst_path) if isinstance(a, dict)}
        imgs = {m.get("id"): m for m in _list_in(instances, "images", inst_path) if isinstance(m, dict)}
        sources += [refs_path, inst_path]

        item = partial(
            _refer_item, store=store, anns=anns, imgs=imgs, bench=bench, split=split, refer_name=harness_name
        )

        k = 0  # sentence index within this dataset's split
        for ref in refs:
            if not isinstance(ref, dict) or "split" not in ref:
                rows.append(
                    _Row(refs_path, k, None, partial(_fail, "a ref must be an object with a 'split'"))
                )
                k += 1
                continue
            if ref["split"] != split:
                continue
            sentences = ref.get("sentences")
            if not isinstance(sentences, list) or not sentences:
                reason = f"ref {ref.get('ref_id')} has no 'sentences' list"
                rows.append(_Row(refs_path, k, _rid(ref, "ref_id"), partial(_fail, reason)))
                k += 1
                continue
            for sent in sentences:
                rid = f"{ref.get('ref_id')}-{sent.get('sent_id') if isinstance(sent, dict) else None}"
                rows.append(_Row(refs_path, k, rid, partial(item, ref, sent)))
                k += 1
    return _run("refcoco", "eval", rows, store, sources, skip_bad, rename_duplicates=rename_duplicates)


# OCID-Ref clutter splits from take_id (harness ocidref.py get_split: bisect_left([9, 16, 20], take_id))
OCID_CLUTTER = ("Minimum Clutter", "Medium Clutter", "Maximum Clutter")
OCID_SPLITS = ("minimum", "medium", "maximum")  # the benchmark registry's split names


def clutter_split(take_id: int) -> str:
    """The harness's clutter split of an OCID take: 0-9 Minimum, 10-16 Medium, 17-20 Maximum Clutter."""
    if not 0 <= take_id <= 20:
        raise ValueError(f"take_id must be in [0, 20], got {take_id}")
    return OCID_CLUTTER[bisect_left([9, 16, 20], take_id)]


def convert_ocidref(
    expressions: str | os.PathLike,
    images: str | os.PathLike | ImageStore,
    *,
    skip_bad: bool = False,
    rename_duplicates: bool = False,
) -> Conversion:
    """OCID-Ref val (val_expressions.json: {id: {scene_path, sentence, bbox "[x1,y1,x2,y2]", take_id, ...}}).

    The bbox string is already pixel xyxy (the harness asserts x1 < x2 <= 640); split = the clutter
    split of take_id; metadata: take_id, clutter, class.
    """
    expressions, store = Path(expressions), _store(images, "ocidref")
    data = _expect(
        read_json(expressions, keep_duplicate_keys=True), dict, expressions, "an object {id: expression}"
    )

    def build(key: str, ex: Any) -> EvalItem:
        raw_box = _req(ex, "bbox", str, list)
        if isinstance(raw_box, str):
            try:
                raw_box = json.loads(raw_box)
            except json.JSONDecodeError:
                raise _Bad(f"field 'bbox': not a JSON list: {raw_box[:60]!r}", "bbox") from None
        take_id = _req(ex, "take_id", int)
        if not 0 <= take_id <= 20:
            raise _Bad(f"field 'take_id' must be in [0, 20], got {take_id}", "take_id")
        image, size = store.image(_req(ex, "scene_path", str))
        clutter = clutter_split(take_id)
        meta = {"take_id": take_id, "clutter": clutter}
        if isinstance(ex.get("class"), str):
            meta["class"] = ex["class"]
        return EvalItem(
            id=key,
            image=image,
            benchmark="ocid-ref",
            split=OCID_SPLITS[OCID_CLUTTER.index(clutter)],
            ref=_req(ex, "sentence", str),
            box=_box(raw_box, size),
            image_size=_size_list(size),
            metadata=meta,
        )

    rows = [_Row(expressions, i, key, partial(build, key, ex)) for i, (key, ex) in enumerate(_items(data))]
    return _run("ocidref", "eval", rows, store, [expressions], skip_bad, rename_duplicates=rename_duplicates)


# ---- training conversations ----------------------------------------------------------------------


def convert_llava(
    path: str | os.PathLike,
    images: str | os.PathLike | ImageStore,
    *,
    skip_bad: bool = False,
    rename_duplicates: bool = False,
) -> Conversion:
    """LLaVA conversations (llava_v1_5_mix665k.json, blip_laion_cc_sbu_558k.json) as TrainRecords.

    Conversations are kept verbatim, in file order; an integer id becomes its string. Records without
    an image (the mix's ~40k text-only ShareGPT conversations) are excluded: a TrainRecord has one
    image. The mix's grounding answers are normalised boxes whose frame (original image or padded
    square) the release does not pin down (LLaVA issues #606, #623, #822), so they are not turned into
    pixel boxes and are trained as the text they are. metadata keeps the record's own metadata (a toy
    world's turns) and adds image_size where the image was measured.
    """
    path, store = Path(path), _store(images, "llava")
    data = _expect(read_json(path), list, path, "a JSON list of conversations")

    def build(raw: Any) -> TrainRecord:
        if not isinstance(raw, dict):
            raise _Bad(f"expected a JSON object, got {type(raw).__name__}")
        rid = _req(raw, "id", str, int)
        if raw.get("image") is None:
            raise _Excluded(
                "text-only conversation (no 'image'): the unified schema has one image per record"
            )
        image, size = store.image(_req(raw, "image", str))
        meta = dict(raw["metadata"]) if isinstance(raw.get("metadata"), dict) else {}
        if size is not None:
            meta.setdefault("image_size", list(size))
        return TrainRecord(
            id=str(rid), image=image, conversations=_req(raw, "conversations", list), metadata=meta
        )

    rows = [_Row(path, i, _rid(raw, "id"), partial(build, raw)) for i, raw in enumerate(data)]
    return _run(
        "llava", "train", rows, store, [path], skip_bad, shuffle=False, rename_duplicates=rename_duplicates
    )


# ---- writing -------------------------------------------------------------------------------------


def _place_images(out: Path, store: ImageStore, image_paths: Iterable[str], copy: bool) -> str:
    """Makes the records' image paths resolve under `out`: one symlink to the image folder, or copies."""
    if not store.prefix:
        return "in place"  # the images already lie under the output root
    target = out / store.prefix
    if copy:
        for rec_path in dict.fromkeys(image_paths):
            dst = out / rec_path
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(store.root / store.used[rec_path], dst)
        return "copy"
    src = store.root.resolve()
    if target.is_symlink():
        if target.resolve() == src:
            return "link"
        raise FileExistsError(f"{target} links to {target.resolve()}, not {src}; remove it first")
    if target.exists():
        if target.resolve() == src:
            return "in place"
        raise FileExistsError(f"{target} exists and is not a link to {src}; remove it or copy images")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, target, target_is_directory=True)
    return "link"


def write_conversion(
    conv: Conversion,
    out: str | os.PathLike,
    *,
    slim: bool = False,
    copy_images: bool = False,
    train_file: str = "llava",
    slim_sizes: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """Writes a conversion under `out` (layout: module docstring) and returns its manifest.

    Every written file is read back through the schema loaders, so it is known to load.

    Args:
        conv: what a converter returned.
        out: output root.
        slim: write only the harness's slim subset (`slim_records`).
        copy_images: copy the used images under out/images/<dataset>/ instead of linking the folder.
        train_file: name of the training file (train/<train_file>.json).
        slim_sizes: override of the slim sizes per benchmark (tests).
    """
    out = Path(out)
    records = conv.records
    if slim and conv.kind == "eval":
        records = slim_records(records, slim_sizes)
    # images first: a conflicting image folder stops the writer before any file changes
    mode = _place_images(out, conv.images, (r.image for r in records), copy_images)
    files: dict[str, int] = {}
    if conv.kind == "train":
        path = write_json(out / "train" / f"{train_file}.json", records)
        files[str(path.relative_to(out))] = len(load_train(path))
    else:
        by_bench: dict[str, list[EvalItem]] = {b: [] for b in conv.benchmarks}
        for r in records:
            by_bench[r.benchmark].append(r)
        for bench, items in by_bench.items():
            path = write_jsonl(out / "eval" / f"{bench}.jsonl", items)
            files[str(path.relative_to(out))] = len(load_eval(path))
    manifest = {
        "dataset": conv.name,
        "kind": conv.kind,
        "sources": conv.sources,
        "counts": {**conv.counts(), "written": len(records)},
        "files": files,
        "slim": slim,
        "order": "file" if conv.kind == "train" else f"harness: random.Random({HARNESS_SEED}).shuffle",
        "images": {
            "root": str(conv.images.root),
            "prefix": conv.images.prefix,
            "check": conv.images.check,
            "mode": mode,
        },
        "renamed": conv.renamed,
        "skipped": [s.to_dict() for s in conv.skipped],
    }
    name = train_file if conv.kind == "train" else conv.name
    write_json(out / "manifests" / f"{name}.json", manifest, indent=1)
    return manifest


def make_slim(
    root: str | os.PathLike,
    out: str | os.PathLike,
    benchmarks: Sequence[str] | None = None,
    copy_images: bool = True,
    sizes: Mapping[str, int | None] | None = None,
) -> dict[str, int]:
    """Writes the slim subsets of a converted root's eval files (in harness order) to a new root.

    Args:
        root: a converted (full) root with eval/<benchmark>.jsonl.
        out: the slim root (eval/ plus the images it uses).
        benchmarks: which benchmarks (default: every eval file).
        copy_images: copy the used images (default) or symlink each one.
        sizes: override of the slim sizes per benchmark.
    Returns {benchmark: items written}.
    """
    root, out = Path(root), Path(out)
    if root.resolve() == out.resolve():
        raise ValueError("the slim root must differ from the full root")
    paths = sorted((root / "eval").glob("*.jsonl"))
    if benchmarks is not None:
        paths = [root / "eval" / f"{b}.jsonl" for b in benchmarks]
    written: dict[str, int] = {}
    for path in paths:
        items = slim_records(load_eval(path), sizes)
        write_jsonl(out / "eval" / path.name, items)
        for image in dict.fromkeys(it.image for it in items):
            src, dst = root / image, out / image
            if dst.exists() or dst.is_symlink():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if copy_images:
                shutil.copy2(src, dst)
            else:
                os.symlink(src.resolve(), dst)
        written[path.stem] = len(items)
    return written


# ---- downloads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Download:
    """One public file of a dataset.

    Args:
        name: the file it gives, as the converter looks it up (for an archive: its extracted name).
        url: where it is published.
        members: for a zip, the member base names to extract flat into the folder; () extracts all.
        images: True for image archives (fetched only on request: they are large).
    """

    name: str
    url: str
    members: tuple[str, ...] = ()
    images: bool = False

    @property
    def is_zip(self) -> bool:
        return self.url.split("?")[0].endswith(".zip")


def download(url: str, dest: str | os.PathLike, timeout: float = 60.0, progress: bool = True) -> Path:
    """Fetches `url` to `dest` (urllib; http(s) or file URLs); kept as is if already there.

    The file is written under a temporary name and renamed, so an interrupted download leaves no
    file that looks complete.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, os.fdopen(fd, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress, leave=False
            ) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def extract(archive: str | os.PathLike, dest: str | os.PathLike, members: Sequence[str] = ()) -> list[Path]:
    """Extracts a zip into `dest`: the named members (by base name, flat) or everything (keeping paths).

    Entries that would land outside `dest` (absolute paths, "..") are refused.
    """
    archive, dest = Path(archive), Path(dest)
    wanted, written = set(members), []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            base = PurePosixPath(info.filename).name
            if wanted and base not in wanted:
                continue
            rel = PurePosixPath(base if wanted else info.filename)
            if rel.is_absolute() or ".." in rel.parts:
                raise DataError(f"{archive}: member {info.filename!r} would leave {dest}", path=archive)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            written.append(target)
    missing = wanted - {p.name for p in written}
    if missing:
        raise DataError(f"{archive}: no member named {', '.join(sorted(missing))}", path=archive)
    return written


def fetch(
    sources: Sequence[Download],
    dest: str | os.PathLike,
    images: bool = False,
    urls: Mapping[str, str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Downloads (and unzips) the dataset files not yet in `dest`; returns the paths of those present.

    Args:
        sources: the dataset's Downloads.
        dest: folder to put them in (the converter's --src, or --images for image archives).
        images: fetch the image archives instead of the annotation files.
        urls: override of a source's URL by its name (mirrors; file:// URLs in tests).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    got = []
    for src in sources:
        if src.images != images:
            continue
        target = dest / src.name
        if not target.exists():
            url = (urls or {}).get(src.name, src.url)
            if src.is_zip:
                with tempfile.TemporaryDirectory(dir=dest) as tmp:
                    extract(
                        download(url, Path(tmp) / f"{src.name}.zip", progress=progress), dest, src.members
                    )
            else:
                download(url, target, progress=progress)
        got.append(target)
    return got


# Public sources, as the harness's registry lists them (TRI-ML/vlm-evaluation vlm_eval/tasks/registry.py)
# and, for LLaVA's files, the liuhaotian/LLaVA-Instruct-150K and LLaVA-Pretrain dataset repositories.
# OCID-Ref has none: its annotations are a Google Drive file and its image link rotates. Archives
# extracted whole keep their inner folders (val2014/, ai2d/, refcoco/, ...).
_POPE_URL = (
    "https://raw.githubusercontent.com/AoiDragon/POPE/e3e39262c85a6a83f26cf5094022a782cb0df58d/output/coco"
)
_COCO_VAL2014 = "http://images.cocodataset.org/zips/val2014.zip"
_VQA_URL = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa"
_GQA_URL = "https://downloads.cs.stanford.edu/nlp/data/gqa"
_VIZWIZ_URL = "https://vizwiz.cs.colorado.edu/VizWiz_final"
_TEXTVQA_OCR_URL = (
    "https://gist.githubusercontent.com/siddk/74a709cb5e292099bae3cbcec1d0ce8a/raw/"
    "74e367e79a23b1043eb469b36168945fbac01601/textvqa_val_v051_ocr.jsonl"
)
_VG_URL = "https://cs.stanford.edu/people/rak248/VG_100K_2"
_TEXTVQA_URL = "https://dl.fbaipublicfiles.com/textvqa"
_TALLYQA_URL = "https://github.com/manoja328/tallyqa/blob/master/tallyqa.zip?raw=true"
_REFER_URL = "https://bvisionweb1.cs.unc.edu/licheng/referit/data"
_LLAVA_URL = "https://huggingface.co/datasets/liuhaotian/LLaVA"
_HF_FILE = "resolve/main"

# fmt: off
SOURCES: dict[str, tuple[Download, ...]] = {
    "vqav2": (
        Download("v2_OpenEnded_mscoco_val2014_questions.json", f"{_VQA_URL}/v2_Questions_Val_mscoco.zip",
                 ("v2_OpenEnded_mscoco_val2014_questions.json",)),
        Download("v2_mscoco_val2014_annotations.json", f"{_VQA_URL}/v2_Annotations_Val_mscoco.zip",
                 ("v2_mscoco_val2014_annotations.json",)),
        Download("val2014", _COCO_VAL2014, images=True),
    ),
    "gqa": (
        Download("testdev_balanced_questions.json", f"{_GQA_URL}/questions1.2.zip",
                 ("testdev_balanced_questions.json",)),
        Download("images", f"{_GQA_URL}/images.zip", images=True),
    ),
    "vizwiz": (
        Download("val.json", f"{_VIZWIZ_URL}/vqa_data/Annotations.zip", ("val.json",)),
        Download("val", f"{_VIZWIZ_URL}/images/val.zip", images=True),
    ),
    "textvqa": (
        Download("TextVQA_0.5.1_val.json", f"{_TEXTVQA_URL}/data/TextVQA_0.5.1_val.json"),
        Download("textvqa_val_v051_ocr.jsonl", _TEXTVQA_OCR_URL),
        Download("train_images", f"{_TEXTVQA_URL}/images/train_val_images.zip", images=True),
    ),
    "pope": (
        *(Download(f"coco_pope_{s}.json", f"{_POPE_URL}/coco_pope_{s}.json") for s in POPE_SPLITS),
        Download("val2014", _COCO_VAL2014, images=True),
    ),
    "vsr": (
        Download("test.jsonl", "https://huggingface.co/datasets/cambridgeltl/vsr_zeroshot/raw/main/test.jsonl"),
        Download("images", "https://www.dropbox.com/s/0s3bj25s62crjh2/vsr_images.zip?dl=1", images=True),
    ),
    "tallyqa": (
        Download("test.json", _TALLYQA_URL, ("test.json",)),
        Download("VG_100K", f"{_VG_URL}/images.zip", images=True),
        Download("VG_100K_2", f"{_VG_URL}/images2.zip", images=True),
    ),
    "ai2d": (
        Download("ai2d", "http://ai2-website.s3.amazonaws.com/data/ai2d-all.zip"),
        Download("ai2d_test_ids.csv", "https://s3-us-east-2.amazonaws.com/prior-datasets/ai2d_test_ids.csv"),
    ),
    "refcoco": (
        *(Download(d, f"{_REFER_URL}/{d}.zip") for d in REFER_DATASETS),
        Download("train2014", "http://images.cocodataset.org/zips/train2014.zip", images=True),
    ),
    "ocidref": (),
    "llava": (
        Download("llava_v1_5_mix665k.json", f"{_LLAVA_URL}-Instruct-150K/{_HF_FILE}/llava_v1_5_mix665k.json"),
        Download("blip_laion_cc_sbu_558k.json",
                 f"{_LLAVA_URL}-Pretrain/{_HF_FILE}/blip_laion_cc_sbu_558k.json"),
    ),
}
# fmt: on


# ---- command line (one thin script per dataset in data_prep/) ------------------------------------


@dataclass(frozen=True)
class Input:
    """One official input of a converter: its keyword, default name inside --src, and help."""

    key: str
    default: str
    help: str
    optional: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """What a converter script needs: its inputs, how to call the converter, where images go."""

    name: str
    inputs: tuple[Input, ...]
    convert: Callable[..., list[Conversion]]
    images_help: str
    options: tuple[tuple[str, dict], ...] = ()  # extra argparse options: (flag, kwargs)


def _textvqa(*, annotations, images, ocr_questions=None, **kw) -> list[Conversion]:
    """Both TextVQA benchmarks (same items, OCR tokens kept or cut by the prompt); without OCR only "pure"."""
    names = ("textvqa-ocr", "textvqa-pure") if ocr_questions is not None else ("textvqa-pure",)
    return [convert_textvqa(annotations, images, ocr_questions, benchmark=b, **kw) for b in names]


def _one(fn: Callable[..., Conversion]) -> Callable[..., list[Conversion]]:
    return lambda **kw: [fn(**kw)]


# fmt: off
DATASETS: dict[str, DatasetSpec] = {
    "vqav2": DatasetSpec("vqav2", (
        Input("questions", "v2_OpenEnded_mscoco_val2014_questions.json", "VQAv2 val questions"),
        Input("annotations", "v2_mscoco_val2014_annotations.json", "VQAv2 val annotations"),
    ), _one(convert_vqav2), "the COCO val2014 image folder"),
    "gqa": DatasetSpec("gqa", (
        Input("questions", "testdev_balanced_questions.json", "GQA testdev-balanced questions"),
    ), _one(convert_gqa), "the GQA images folder"),
    "vizwiz": DatasetSpec("vizwiz", (
        Input("annotations", "val.json", "VizWiz val annotations"),
    ), _one(convert_vizwiz), "the VizWiz val image folder"),
    "textvqa": DatasetSpec("textvqa", (
        Input("annotations", "TextVQA_0.5.1_val.json", "TextVQA val annotations"),
        Input("ocr_questions", "textvqa_val_v051_ocr.jsonl", "LLaVA's questions with OCR", optional=True),
    ), _textvqa, "the TextVQA train_images folder"),
    "pope": DatasetSpec("pope", tuple(
        Input(s, f"coco_pope_{s}.json", f"POPE {s} questions") for s in POPE_SPLITS
    ), _one(convert_pope), "the COCO val2014 image folder"),
    "vsr": DatasetSpec("vsr", (
        Input("questions", "test.jsonl", "VSR zero-shot test split"),
    ), _one(convert_vsr), "the VSR images folder"),
    "tallyqa": DatasetSpec("tallyqa", (
        Input("questions", "test.json", "TallyQA test questions"),
    ), _one(convert_tallyqa), "the Visual Genome folder holding VG_100K/ and VG_100K_2/"),
    "ai2d": DatasetSpec("ai2d", (
        Input("questions_dir", "ai2d/questions", "AI2D question files"),
        Input("test_ids", "ai2d_test_ids.csv", "AI2D test image ids"),
    ), _one(convert_ai2d), "the AI2D images folder (ai2d/images)"),
    "refcoco": DatasetSpec("refcoco", (
        Input("refer_root", "", "refer's data folder with refcoco/, refcoco+/, refcocog/"),
    ), _one(convert_refcoco), "the COCO train2014 image folder", (
        ("--datasets", {"nargs": "+", "default": list(REFER_DATASETS), "choices": list(REFER_DATASETS),
                        "help": "refer datasets to convert (all three reproduce the harness's shuffle)"}),
    )),
    "ocidref": DatasetSpec("ocidref", (
        Input("expressions", "val_expressions.json", "OCID-Ref val expressions"),
    ), _one(convert_ocidref), "the OCID-dataset folder (scene_path is relative to it)"),
    "llava": DatasetSpec("llava", (
        Input("path", "llava_v1_5_mix665k.json", "LLaVA conversations (665k mix or 558k pretrain)"),
    ), _one(convert_llava), "LLaVA's image folder (playground/data: coco/, gqa/, ocr_vqa/, textvqa/, vg/)"),
}
# fmt: on


def _resolve(spec: DatasetSpec, args: argparse.Namespace) -> dict[str, Path | None]:
    src = Path(args.src) if args.src else None
    paths: dict[str, Path | None] = {}
    for inp in spec.inputs:
        given = getattr(args, inp.key)
        if given is not None:
            paths[inp.key] = Path(given)
        elif src is not None and src.is_file() and len(spec.inputs) == 1:
            paths[inp.key] = src
        elif src is not None and (src / inp.default).exists():
            paths[inp.key] = src / inp.default  # an empty default names --src itself
        elif inp.optional:
            paths[inp.key] = None
        else:
            flag = f"--{inp.key.replace('_', '-')}"
            looked = f" (looked for {src / inp.default})" if src is not None else ""
            holding = inp.default or "them"
            raise SystemExit(
                f"error: {inp.help} not found{looked}: give --src DIR holding {holding} or {flag}"
            )
    return paths


def run_cli(dataset: str, argv: Sequence[str] | None = None, doc: str | None = None) -> int:
    """The converter script of `dataset`: parse arguments, (download,) convert, write, print counts."""
    spec = DATASETS[dataset]
    ap = argparse.ArgumentParser(
        prog=f"convert_{dataset}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--src",
        type=Path,
        help="folder holding the official files under their official names "
        "(or the file itself for one-file datasets)",
    )
    for inp in spec.inputs:
        ap.add_argument(
            f"--{inp.key.replace('_', '-')}",
            dest=inp.key,
            type=Path,
            help=f"{inp.help} (default: <src>/{inp.default or ''})",
        )
    ap.add_argument("--images", type=Path, required=True, help=spec.images_help)
    ap.add_argument(
        "--out", type=Path, required=True, help="output root (eval/, train/, images/, manifests/)"
    )
    ap.add_argument(
        "--skip-bad", action="store_true", help="skip bad records (listed at the end) instead of failing"
    )
    if dataset != "llava":
        ap.add_argument("--slim", action="store_true", help="write only the harness's slim subset")
    ap.add_argument(
        "--check-images",
        choices=CHECKS,
        default="header",
        help="header: exists and PIL reads its header (default); decode: decodes fully; exists: only exists",
    )
    ap.add_argument(
        "--copy-images", action="store_true", help="copy used images instead of linking the folder"
    )
    ap.add_argument(
        "--rename-duplicate-ids", action="store_true", help="rename repeated ids to <id>#2, ... (listed)"
    )
    if dataset == "llava":
        ap.add_argument("--train-file", default="llava", help="writes train/<name>.json (default: llava)")
    if SOURCES.get(dataset):
        ap.add_argument(
            "--download", action="store_true", help="first fetch missing official files into --src"
        )
        ap.add_argument(
            "--download-images", action="store_true", help="first fetch the image archives into --images"
        )
        ap.add_argument(
            "--url", action="append", default=[], metavar="NAME=URL", help="override a source's URL"
        )
    for flag, kwargs in spec.options:
        ap.add_argument(flag, **kwargs)
    args = ap.parse_args(argv)

    if getattr(args, "download", False) or getattr(args, "download_images", False):
        urls = dict(u.split("=", 1) for u in args.url)
        if args.download and args.src is None:
            ap.error("--download needs --src (where to put the files)")
        try:
            if args.download:
                fetch(SOURCES[dataset], args.src, urls=urls)
            if args.download_images:
                fetch(SOURCES[dataset], args.images, images=True, urls=urls)
        except (OSError, DataError) as e:  # URLError is an OSError
            print(f"error: download failed: {e}", file=sys.stderr)
            return 1

    paths = _resolve(spec, args)
    store = ImageStore(args.images, f"images/{dataset}", args.check_images)
    dests = [flag.lstrip("-").replace("-", "_") for flag, _ in spec.options]
    extra = {d: getattr(args, d) for d in dests}
    try:
        convs = spec.convert(
            **paths,
            images=store,
            skip_bad=args.skip_bad,
            rename_duplicates=args.rename_duplicate_ids,
            **extra,
        )
        for conv in convs:
            m = write_conversion(
                conv,
                args.out,
                slim=getattr(args, "slim", False),
                copy_images=args.copy_images,
                train_file=getattr(args, "train_file", "llava"),
            )
            print(_summary_line(m))
    except (DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    shown = {str(s): s for conv in convs for s in conv.skipped}  # TextVQA's two benchmarks skip alike
    if shown:
        print(f"skipped ({len(shown)}):")
        for i, s in enumerate(shown.values()):
            if i == 50:
                print(f"  ... and {len(shown) - 50} more (manifests/ lists them all)")
                break
            print(f"  {'excluded' if s.excluded else 'bad'}: {s}")
    return 0


def _summary_line(m: Mapping[str, Any]) -> str:
    c = m["counts"]
    files = ", ".join(f"{f} ({n})" for f, n in m["files"].items())
    slim = " (slim)" if m["slim"] else ""
    return (
        f"{m['dataset']}: in {c['in']} | out {c['out']} | skipped {c['skipped']} (bad {c['bad']}, "
        f"excluded {c['excluded']}) | written {c['written']}{slim}: {files}"
    )
