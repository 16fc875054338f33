"""The unified data schema: training conversations, evaluation items, classification items.

Every dataset under `data/` (the toy world and the converted real ones) is written in these three
record types, so the training and evaluation code reads one format:

- `TrainRecord`: LLaVA's conversation format (llava_v1_5_mix665k.json): {"id", "image",
  "conversations": [{"from": "human" | "gpt", "value": ...}, ...]}, plus our optional `metadata`
  (for grounding turns: {"task": "ref", "box": [x1, y1, x2, y2] in original pixels, "image_size":
  [w, h]} so any geometry can re-render the answer; for VQA: {"task": "vqa", "qtype": ...}).
- `EvalItem`: one benchmark question (VQA: `question` + 10 `answers`) or referring expression
  (grounding: `ref` + `box` in original pixels), one JSON line each.
- `ClassItem`: one labelled image of a classification set (toy encoder pretraining).

Boxes are (x1, y1, x2, y2) in original image pixels with the convention of `vlmlab.geometry`
(pixel i spans [i, i + 1)). Image paths are relative to the dataset root.

Loaders validate every record and raise `DataError` naming the file, the record index (0-based) and
id, and the field, e.g. "data/x/eval/toy-vqa.jsonl: record 17 (id 'vqa-000017'): field 'answers': ...".
Writers are atomic (temp file + rename) and deterministic (sorted keys).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

IMAGE_TOKEN = "<image>"


class DataError(ValueError):
    """A data file or record that does not follow the schema; the message locates the problem."""

    def __init__(
        self,
        message: str,
        path: str | os.PathLike | None = None,
        index: int | None = None,
        record_id: str | None = None,
        field: str | None = None,
    ):
        super().__init__(message)
        self.path, self.index, self.record_id, self.field = path, index, record_id, field


# ---- shared checks -------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_box(box: Sequence[float], image_size: Sequence[int] | None = None) -> None:
    if not isinstance(box, list | tuple) or not all(_is_number(v) for v in box):
        raise ValueError(f"a box is a list of 4 numbers [x1, y1, x2, y2], got {box!r}")
    if len(box) != 4:
        raise ValueError(f"a box is [x1, y1, x2, y2], got {len(box)} numbers")
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"box {list(box)} is not finite")
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"box {list(box)} needs x1 < x2 and y1 < y2")
    if image_size is not None:
        w, h = image_size
        if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
            raise ValueError(f"box {list(box)} is outside the {w}x{h} image")


def _check_image_size(size: Sequence[int]) -> None:
    ok = isinstance(size, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    if not ok or len(size) != 2 or not all(v > 0 for v in size):
        raise ValueError(f"image_size is [width, height] > 0, got {list(size)}")


# ---- records -------------------------------------------------------------------------------------


class Turn(BaseModel):
    """One conversation turn; `from` in JSON (a Python keyword, hence `from_`)."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    from_: Literal["human", "gpt"] = Field(alias="from")
    value: str


class TrainRecord(BaseModel):
    """A LLaVA-format training conversation about one image."""

    # LLaVA's own files carry a few extra keys on some records (e.g. "model"); they are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")

    id: str
    image: str
    conversations: list[Turn]
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("conversations")
    @classmethod
    def _alternating_with_one_image(cls, turns: list[Turn]) -> list[Turn]:
        if len(turns) < 2:
            raise ValueError("needs at least one human turn and one gpt answer")
        for i, t in enumerate(turns):
            want = "human" if i % 2 == 0 else "gpt"
            if t.from_ != want:
                raise ValueError(
                    f"turn {i} is from {t.from_!r}, expected {want!r} (human first, alternating)"
                )
        if turns[-1].from_ != "gpt":
            raise ValueError("the last turn must be a gpt answer")
        n = turns[0].value.count(IMAGE_TOKEN)
        if n != 1:
            raise ValueError(f"the first human turn must contain {IMAGE_TOKEN!r} exactly once, found {n}")
        for i, t in enumerate(turns[1:], start=1):
            if IMAGE_TOKEN in t.value:
                raise ValueError(f"turn {i} contains {IMAGE_TOKEN!r}; only the first human turn may")
        return turns

    @field_validator("metadata")
    @classmethod
    def _grounding_metadata(cls, meta: dict[str, Any]) -> dict[str, Any]:
        if meta.get("task") == "ref":
            if "box" not in meta or "image_size" not in meta:
                raise ValueError("a 'ref' record needs 'box' and 'image_size'")
            _check_image_size(meta["image_size"])
            _check_box(meta["box"], meta["image_size"])
        return meta


class EvalItem(BaseModel):
    """One evaluation item: a VQA question (with reference answers) or a referring expression (with box)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    id: str
    image: str
    benchmark: str
    split: str
    question: str | None = None
    ref: str | None = None
    answers: list[str] | None = None
    box: list[float] | None = None  # x1, y1, x2, y2 in original pixels
    image_size: list[int] | None = None  # width, height
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("answers")
    @classmethod
    def _some_answers(cls, answers: list[str] | None) -> list[str] | None:
        if answers is not None and not answers:
            raise ValueError("must not be empty")
        return answers

    @field_validator("box")
    @classmethod
    def _valid_box(cls, box: list[float] | None) -> list[float] | None:
        if box is not None:
            _check_box(box)
        return box

    @field_validator("image_size")
    @classmethod
    def _valid_size(cls, size: list[int] | None) -> list[int] | None:
        if size is not None:
            _check_image_size(size)
        return size

    # Model-level errors carry no field location, so their messages name the field themselves.
    @model_validator(mode="after")
    def _one_task(self) -> EvalItem:
        if (self.question is None) == (self.ref is None):
            raise ValueError("field 'question'/'ref': exactly one of them must be given")
        if self.question is not None and self.answers is None:
            raise ValueError("field 'answers': required for a question")
        if self.ref is not None and self.box is None:
            raise ValueError("field 'box': required for a referring expression")
        if self.box is not None and self.image_size is not None:
            try:
                _check_box(self.box, self.image_size)
            except ValueError as e:
                raise ValueError(f"field 'box': {e}") from None
        return self

    @property
    def task(self) -> str:
        return "vqa" if self.question is not None else "ref"


class ClassItem(BaseModel):
    """One labelled image of a classification set."""

    model_config = ConfigDict(strict=True, extra="forbid")

    id: str
    image: str
    label: int = Field(ge=0)
    label_name: str


R = TypeVar("R", bound=BaseModel)

# ---- reading -------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}", path=path) from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}", path=path
        ) from e


def _read_jsonl(path: Path) -> list[Any]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}", path=path) from e
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: record {len(rows)} (line {lineno}): invalid JSON at column {e.colno} "
                f"(char {e.pos}): {e.msg}",
                path=path,
                index=len(rows),
            ) from e
    return rows


def _describe(path: Path, index: int, raw: Any) -> str:
    rid = raw.get("id") if isinstance(raw, dict) else None
    return f"{path}: record {index}" + (f" (id {rid!r})" if rid is not None else "")


def _validate_all(path: Path, rows: list[Any], model: type[R]) -> list[R]:
    out: list[R] = []
    first_index: dict[str, int] = {}
    for i, raw in enumerate(rows):
        where = _describe(path, i, raw)
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}", path=path, index=i)
        rid = raw.get("id")
        try:
            rec = model.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            more = f" (and {e.error_count() - 1} more errors)" if e.error_count() > 1 else ""
            if field:
                text = f"{where}: field {field!r}: {msg}{more}"
            else:  # a model-level check, whose message starts with "field '<name>': "
                text = f"{where}: {msg}{more}"
                field = msg.split("'")[1] if msg.startswith("field '") else ""
            raise DataError(text, path=path, index=i, record_id=rid, field=field or None) from None
        if rec.id in first_index:  # type: ignore[attr-defined]
            raise DataError(
                f"{path}: duplicate id {rec.id!r} at records {first_index[rec.id]} and {i}",  # type: ignore[attr-defined]
                path=path,
                index=i,
                record_id=rec.id,  # type: ignore[attr-defined]
                field="id",
            )
        first_index[rec.id] = i  # type: ignore[attr-defined]
        out.append(rec)
    return out


def load_train(path: str | os.PathLike) -> list[TrainRecord]:
    """Reads a LLaVA-format JSON list of conversations."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}", path=path)
    return _validate_all(path, data, TrainRecord)


def load_eval(path: str | os.PathLike) -> list[EvalItem]:
    """Reads evaluation items, one JSON object per line."""
    path = Path(path)
    return _validate_all(path, _read_jsonl(path), EvalItem)


def load_class(path: str | os.PathLike) -> list[ClassItem]:
    """Reads classification items, one JSON object per line."""
    path = Path(path)
    return _validate_all(path, _read_jsonl(path), ClassItem)


def load_image(root: str | os.PathLike, record: Any) -> Image.Image:
    """Opens and fully decodes a record's image (path relative to `root`) as RGB.

    Args:
        root: the dataset root the record's `image` path is relative to.
        record: a record with `id` and `image` (a schema model or a dict).
    """
    get = record.get if isinstance(record, dict) else lambda k: getattr(record, k, None)
    rid, rel = get("id"), get("image")
    path = Path(root) / str(rel)
    if not path.is_file():
        raise DataError(f"{path}: image of record {rid!r} not found", path=path, record_id=rid, field="image")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated or corrupt files fail here, not later in a worker
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"{path}: cannot read image of record {rid!r}: {type(e).__name__}: {e}",
            path=path,
            record_id=rid,
            field="image",
        ) from e


# ---- writing -------------------------------------------------------------------------------------


def record_to_dict(record: Any) -> Any:
    """A schema model as its JSON object (aliases; unset nulls and empty metadata left out)."""
    if isinstance(record, BaseModel):
        return record.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    return record


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """Writes `obj` (records are converted with `record_to_dict`) as JSON, atomically, keys sorted."""
    if isinstance(obj, list | tuple):
        obj = [record_to_dict(r) for r in obj]
    else:
        obj = record_to_dict(obj)
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=indent, allow_nan=False) + "\n"
    _atomic_write_text(Path(path), text)
    return Path(path)


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """Writes one JSON object per line, atomically, keys sorted."""
    lines = [
        json.dumps(record_to_dict(r), sort_keys=True, ensure_ascii=False, allow_nan=False) for r in records
    ]
    _atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
    return Path(path)
