"""The toy world: generated scenes, questions and referring expressions in the unified schema.

No weights or datasets can be downloaded at run time, so the default study runs on this world. It
exercises every code path of the real one with the same file formats (vlmlab.data.schema):

- scenes of 1-6 objects (6 shapes x 6 colours x 3 sizes) on textured, muted backgrounds; about 30%
  of the images are 4:3 or 3:4 so that geometry policies matter; objects never overlap and every
  object's tight pixel box is known exactly (it is read off the drawn mask);
- a classification set (the toy "ImageNet"): the label is shape * 6 + colour of the largest object;
- LLaVA-format training conversations: VQA (colour, shape, count, exist, spatial) with single-word
  answers, and grounding turns with the paper's prompt whose answer is the box normalised to the
  letterbox-center square frame with 2 decimals (LLaVA-1.5's convention);
- evaluation items: toy-vqa (10 reference answers with seeded annotator noise, for VQA-style
  min(#matches / 3, 1) scoring) and toy-ref (RefCOCO-like: expression + box in original pixels).

Everything is a pure function of (config, split, index): the same seed gives byte-identical files.
Layout of a world directory: see `generate_world`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from vlmlab.data.schema import IMAGE_TOKEN, ClassItem, EvalItem, TrainRecord, write_json, write_jsonl
from vlmlab.geometry import format_box, plan

WORLD_VERSION = 2  # bump when the generator changes what a config produces

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SHAPE_PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "ring": "rings",
}
# Saturated colours, each with a channel outside the backgrounds' [70, 170] range, so an object's
# pixels can never be confused with the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 90, 225),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "medium", "large")
SIZE_FRACTIONS = (0.16, 0.24, 0.34)  # object side as a fraction of the image's long side
BACKGROUND_RANGE = (70, 170)

# label = shape_idx * 6 + colour_idx (36 classes = vlmlab.encoders.base.TOY_NUM_CLASSES)
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES)
NUMBERS = ("1", "2", "3", "4", "5", "6")
QTYPES = ("colour", "shape", "count", "exist", "spatial")
ANSWER_TYPES: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "count": NUMBERS,
    "exist": ("yes", "no"),
    "spatial": ("yes", "no"),
}
# Annotator noise: a synonym (scorers may or may not normalise it) or else a wrong answer.
SYNONYMS = {
    "purple": "violet",
    "ring": "donut",
    "cross": "plus",
    "diamond": "rhombus",
    "square": "box",
    "yes": "yeah",
    "1": "one",
    "2": "two",
    "3": "three",
    "4": "four",
    "5": "five",
    "6": "six",
}

VQA_SUFFIX = "Answer the question using a single word or phrase."  # LLaVA-1.5 short-answer prompt
GROUNDING_PROMPT = 'Please provide the bounding box coordinate of the region this sentence describes: "{ref}"'
SPLITS = ("pretrain", "train", "test")
_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}
_WORD = re.compile(r"[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]")


def data_root() -> Path:
    """Root of generated datasets: $VLMLAB_DATA or <project>/data (see vlmlab.config.data_dir)."""
    from vlmlab.config import data_dir

    return data_dir()


def load_scenes(root: str | os.PathLike, split: str) -> dict[str, dict]:
    """Every scene of a split (objects with shape, colour, size, box), keyed by image path."""
    path = Path(root) / "scenes" / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["image"]: r for r in rows}


def largest_object_box(scene: dict) -> list[float]:
    """Box (original pixels) of the scene's largest object: the object behind its class label."""
    area = lambda o: (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1])  # noqa: E731
    return [float(v) for v in max(scene["objects"], key=area)["box"]]


@dataclass(frozen=True)
class WorldConfig:
    """What a toy world contains; a world directory is a pure function of it (and WORLD_VERSION).

    Args:
        seed: base seed; image i of split s uses the seed sequence (seed, s, i).
        image_size: long side in pixels; non-square images are 4:3 or 3:4.
        nonsquare_fraction: fraction of images that are not square.
        n_pretrain: classification images (the toy ImageNet); the last `class_test_fraction` are its test set.
        n_train: VLM training images. n_test: VLM evaluation images.
        max_objects: at most this many objects per scene (at least 1).
        questions_per_image: VQA questions per train/test image. refs_per_image: referring expressions.
        answer_noise: fraction of evaluation questions with 1-3 noisy reference answers.
        n_references: reference answers per evaluation question.
    """

    seed: int = 0
    image_size: int = 64
    nonsquare_fraction: float = 0.3
    n_pretrain: int = 256
    n_train: int = 256
    n_test: int = 64
    max_objects: int = 6
    questions_per_image: int = 3
    refs_per_image: int = 2
    class_test_fraction: float = 0.2
    answer_noise: float = 0.3
    n_references: int = 10

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 to draw recognisable shapes, got {self.image_size}")
        if not 1 <= self.max_objects <= 6:
            raise ValueError(f"max_objects must be in 1..6, got {self.max_objects}")
        for name in ("nonsquare_fraction", "class_test_fraction", "answer_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.n_references < 4:  # 1-3 noisy answers must stay a minority
            raise ValueError(f"n_references must be >= 4, got {self.n_references}")


WORLD_PRESETS: dict[str, WorldConfig] = {
    "smoke": WorldConfig(image_size=48, n_pretrain=256, n_train=256, n_test=64),
    "toy-cpu": WorldConfig(
        image_size=80, n_pretrain=3000, n_train=3000, n_test=300, questions_per_image=6, refs_per_image=3
    ),
    "toy-gpu": WorldConfig(
        image_size=256, n_pretrain=8000, n_train=6000, n_test=500, questions_per_image=6, refs_per_image=3
    ),
}


# ---- scenes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyObject:
    """One drawn object: attributes, the square it is drawn in (x0, y0, side) and its tight pixel box."""

    shape: str
    colour: str
    size: str
    square: tuple[int, int, int]
    box: tuple[int, int, int, int]  # x1, y1, x2, y2; pixel i spans [i, i + 1)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def label(self) -> int:
        return SHAPES.index(self.shape) * len(COLOURS) + COLOUR_NAMES.index(self.colour)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "square": list(self.square),
            "box": list(self.box),
        }


@dataclass(frozen=True)
class Scene:
    id: str
    split: str
    width: int
    height: int
    background: str
    objects: tuple[ToyObject, ...] = field(default_factory=tuple)

    @property
    def image(self) -> str:
        """Image path relative to the world root."""
        return f"images/{self.split}/{self.id}.png"

    @property
    def long_side(self) -> int:
        return max(self.width, self.height)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image": self.image,
            "image_size": [self.width, self.height],
            "background": self.background,
            "objects": [o.to_dict() for o in self.objects],
        }


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, s: int, fill: Any) -> None:
    """Draws `shape` inside the square [x0, x0 + s) x [y0, y0 + s) (aliased, so pixels are exact)."""
    x1, y1 = x0 + s - 1, y0 + s - 1  # PIL's shape coordinates are inclusive
    cx, cy = x0 + (s - 1) / 2, y0 + (s - 1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        t = max(2, s // 3)
        o = (s - t) // 2
        draw.rectangle((x0, y0 + o, x1, y0 + o + t - 1), fill=fill)
        draw.rectangle((x0 + o, y0, x0 + o + t - 1, y1), fill=fill)
    elif shape == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=fill, width=max(2, s // 5))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def object_mask(obj: ToyObject, width: int, height: int) -> np.ndarray:
    """Boolean [height, width] mask of the pixels `obj` covers (e.g. for toy segmentation)."""
    mask = Image.new("L", (width, height), 0)
    draw_shape(ImageDraw.Draw(mask), obj.shape, *obj.square, fill=255)
    return np.asarray(mask) > 0


def _rng(cfg: WorldConfig, split: str, index: int, stream: int) -> np.random.Generator:
    # one independent stream per (image, purpose): pixels, language, annotator noise
    return np.random.default_rng([cfg.seed, _SPLIT_CODE[split], index, stream])


def _background(rng: np.random.Generator, w: int, h: int, long_side: int) -> tuple[np.ndarray, str]:
    lo, hi = BACKGROUND_RANGE
    c0 = rng.uniform(lo + 15, hi - 15, size=3).astype(np.float32)
    c1 = np.clip(c0 + rng.uniform(-30, 30, size=3), lo, hi).astype(np.float32)
    if rng.random() < 0.5:
        kind = "stripes"
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.25) * long_side
        phase = rng.uniform(0, 2 * np.pi)
        # sin(ax + by + phase) = sin(ax) cos(by + phase) + cos(ax) sin(by + phase): two outer products
        ax = 2 * np.pi * np.cos(theta) / period * np.arange(w, dtype=np.float32)
        by = 2 * np.pi * np.sin(theta) / period * np.arange(h, dtype=np.float32) + phase
        wave = np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))
        t = (0.5 + 0.5 * wave).astype(np.float32)
    else:
        kind = "noise"
        cells = int(rng.integers(3, 8))
        coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8), mode="L")
        t = np.asarray(coarse.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    # no per-pixel noise: it would make the PNGs ~8x larger (incompressible) for no gain in texture
    img = c0 + (c1 - c0) * t[..., None]
    return np.clip(np.rint(img), lo, hi).astype(np.uint8), kind


def make_scene(cfg: WorldConfig, split: str, index: int) -> tuple[Scene, Image.Image]:
    """Scene `index` of `split` and its rendered image; a pure function of its arguments."""
    rng = _rng(cfg, split, index, 0)
    L = cfg.image_size
    w = h = L
    if rng.random() < cfg.nonsquare_fraction:
        short = int(round(L * 3 / 4))
        w, h = (L, short) if rng.random() < 0.5 else (short, L)
    pixels, kind = _background(rng, w, h, L)
    image = Image.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(image)

    n = int(rng.integers(1, cfg.max_objects + 1))
    # Pretraining scenes have one strictly largest object: it defines the class label.
    sizes = [int(rng.integers(0, 3)) for _ in range(n)]
    if split == "pretrain":
        sizes = [2] + [int(rng.integers(0, 2)) for _ in range(n - 1)]
    gap = 2  # free pixels between objects, so tight boxes never touch
    taken: list[tuple[int, int, int, int]] = []
    objects: list[ToyObject] = []
    for size_idx in sizes:
        s = max(6, int(round(SIZE_FRACTIONS[size_idx] * L)))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = COLOUR_NAMES[int(rng.integers(len(COLOURS)))]
        for _ in range(50):  # rejection sampling of a free square; the object is dropped if none
            x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            if all(
                x0 + s + gap <= a or a2 + gap <= x0 or y0 + s + gap <= b or b2 + gap <= y0
                for a, b, a2, b2 in taken
            ):
                break
        else:
            if objects:
                continue
            raise RuntimeError("could not place the first object")  # cannot happen: the image is empty
        taken.append((x0, y0, x0 + s, y0 + s))
        mask = Image.new("L", (w, h), 0)
        draw_shape(ImageDraw.Draw(mask), shape, x0, y0, s, fill=255)
        box = mask.getbbox()  # (left, top, right, bottom), right/bottom exclusive = our convention
        draw.bitmap((0, 0), mask, fill=COLOURS[colour])
        objects.append(ToyObject(shape, colour, SIZES[size_idx], (x0, y0, s), box))
    scene = Scene(f"{split}-{index:06d}", split, w, h, kind, tuple(objects))
    return scene, image


# ---- language: descriptions that pick out exactly one object ------------------------------------

_ATTRS = ("size", "colour", "shape")
_PAIR_MODS = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}  # exactly two in the group
_MOST_MODS = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}


def _margin(scene: Scene) -> float:
    return max(2.0, 0.08 * scene.long_side)


def _text(attrs: dict[str, str], mod: str | None) -> str:
    words = ["the"] + ([mod] if mod else [])
    words += [attrs[a] for a in ("size", "colour") if a in attrs]
    words.append(attrs.get("shape", "object"))
    return " ".join(words)


def describe(scene: Scene, k: int, exclude: Iterable[str] = (), modifiers: bool = True) -> list[str]:
    """Every expression "the [modifier] [size] [colour] (shape | object)" that picks out object k only.

    Args:
        scene: the scene.
        k: index of the object to describe.
        exclude: attributes the expression must not mention (e.g. "colour" for a colour question).
        modifiers: allow positional / superlative modifiers ("left", "leftmost", "largest", ...).
    """
    obj, margin = scene.objects[k], _margin(scene)
    allowed = [a for a in _ATTRS if a not in set(exclude)]
    out = []
    for mask in range(2 ** len(allowed)):  # every subset of the allowed attributes, {} = "object"
        attrs = {a: getattr(obj, a) for i, a in enumerate(allowed) if mask >> i & 1}
        group = [o for o in scene.objects if all(getattr(o, a) == v for a, v in attrs.items())]
        others = [o for o in group if o is not obj]
        if not others:
            if attrs:  # "the object" alone would be odd even where it is unambiguous
                out.append(_text(attrs, None))
            continue
        if not modifiers:
            continue
        if "size" not in attrs:
            rank = SIZES.index(obj.size)
            if all(SIZES.index(o.size) < rank for o in others):
                out.append(_text(attrs, "largest"))
            if all(SIZES.index(o.size) > rank for o in others):
                out.append(_text(attrs, "smallest"))
        # "left"/"right"/... compare two objects, "leftmost"/... three or more; always by a margin
        for mod, (axis, sign) in (_PAIR_MODS if len(others) == 1 else _MOST_MODS).items():
            if all(sign * (obj.center[axis] - o.center[axis]) > margin for o in others):
                out.append(_text(attrs, mod))
    return out


def _pick(rng: np.random.Generator, items: list) -> Any:
    return items[int(rng.integers(len(items)))]


def _question(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of `qtype` about the scene, or None where the scene cannot support it."""
    objs = scene.objects
    if qtype in ("colour", "shape"):
        attr = qtype
        choices = [(k, d) for k in range(len(objs)) for d in describe(scene, k, exclude=[attr])]
        if not choices:
            return None
        k, desc = _pick(rng, choices)
        word = "color" if attr == "colour" else "shape"
        return f"What {word} is {desc}?", getattr(objs[k], attr)
    if qtype == "count":
        kind = _pick(rng, ["all", "colour", "shape"])
        if kind == "all":
            return "How many objects are there?", str(len(objs))
        value = getattr(_pick(rng, list(objs)), kind)
        n = sum(getattr(o, kind) == value for o in objs)
        noun = f"{value} objects" if kind == "colour" else SHAPE_PLURALS[value]
        return f"How many {noun} are there?", str(n)
    if qtype == "exist":
        present = sorted({(o.colour, o.shape) for o in objs})
        absent = [(c, s) for s in SHAPES for c in COLOUR_NAMES if (c, s) not in present]
        yes = rng.random() < 0.5
        colour, shape = _pick(rng, present if yes else absent)
        return f"Is there a {colour} {shape}?", "yes" if yes else "no"
    if qtype == "spatial":
        margin = _margin(scene)
        pairs = []
        for a in range(len(objs)):
            for b in range(len(objs)):
                if a == b:
                    continue
                for axis in (0, 1):
                    delta = objs[a].center[axis] - objs[b].center[axis]
                    if abs(delta) > margin:
                        pairs.append((a, b, axis, delta))
        rng.shuffle(pairs)
        for a, b, axis, delta in pairs:
            da, db = describe(scene, a, modifiers=False), describe(scene, b, modifiers=False)
            if not da or not db:
                continue
            relation = _pick(rng, ["to the left of", "to the right of"] if axis == 0 else ["above", "below"])
            before = relation in ("to the left of", "above")  # a has the smaller coordinate
            answer = "yes" if (delta < 0) == before else "no"
            return f"Is {_pick(rng, da)} {relation} {_pick(rng, db)}?", answer
        return None
    raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(QTYPES)}")


def scene_questions(scene: Scene, n: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Up to n distinct (qtype, question, answer) about the scene, question types balanced."""
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    order = [QTYPES[int(i)] for i in rng.permutation(len(QTYPES))]
    for attempt in range(4 * len(QTYPES)):
        if len(out) == n:
            break
        qtype = order[attempt % len(order)]
        qa = _question(scene, qtype, rng)
        if qa is not None and qa[0] not in seen:
            seen.add(qa[0])
            out.append((qtype, *qa))
    return out


def scene_refs(scene: Scene, n: int, rng: np.random.Generator) -> list[tuple[int, str]]:
    """Up to n (object index, expression) for distinct objects; each expression picks out one object."""
    candidates = [(k, describe(scene, k)) for k in range(len(scene.objects))]
    candidates = [(k, d) for k, d in candidates if d]
    order = rng.permutation(len(candidates))[:n]
    return [(candidates[i][0], _pick(rng, candidates[i][1])) for i in sorted(int(i) for i in order)]


def square_frame_box(box: Iterable[float], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Original-pixel box -> [0, 1] box in the letterbox-center square frame (LLaVA-1.5's answers)."""
    t = plan("letterbox-center", image_size, max(image_size))
    return t.box_to_normalized(t.box_to_input(box))


def _noisy_answers(answer: str, qtype: str, cfg: WorldConfig, rng: np.random.Generator) -> list[str]:
    answers = [answer] * cfg.n_references
    if rng.random() < cfg.answer_noise:
        k = int(rng.integers(1, 4))
        for pos in rng.choice(cfg.n_references, size=k, replace=False):
            if answer in SYNONYMS and rng.random() < 0.5:
                answers[int(pos)] = SYNONYMS[answer]
            else:
                answers[int(pos)] = _pick(rng, [a for a in ANSWER_TYPES[qtype] if a != answer])
    return answers


def split_words(text: str) -> list[str]:
    """Word-level tokens of the toy world's text: words, single digits, single punctuation marks."""
    return _WORD.findall(text.replace(IMAGE_TOKEN, " "))


# ---- writing a world -----------------------------------------------------------------------------


def _render(cfg: WorldConfig, split: str, start: int, stop: int, images_dir: Path) -> list[Scene]:
    scenes = []
    for i in range(start, stop):
        scene, image = make_scene(cfg, split, i)
        # fixed PNG options and no metadata: the bytes depend on the pixels only
        image.save(images_dir / split / f"{scene.id}.png", format="PNG", compress_level=6)
        scenes.append(scene)
    return scenes


def _scenes(
    cfg: WorldConfig, split: str, n: int, images_dir: Path, progress: bool, workers: int
) -> list[Scene]:
    (images_dir / split).mkdir(parents=True, exist_ok=True)
    chunk = 64
    starts = range(0, n, chunk)
    bar = tqdm(total=n, desc=f"toy world {split}", disable=not progress, leave=False)
    scenes: list[Scene] = []
    if workers <= 1 or n <= chunk:
        for a in starts:
            scenes += _render(cfg, split, a, min(a + chunk, n), images_dir)
            bar.update(min(a + chunk, n) - a)
    else:  # every image is a pure function of its index, so parallel output is identical
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_render, cfg, split, a, min(a + chunk, n), images_dir) for a in starts]
            for f in futures:
                scenes += f.result()
                bar.update(len(scenes) - bar.n)
    bar.close()
    return scenes


def _write(cfg: WorldConfig, root: Path, progress: bool, workers: int = 1) -> dict[str, Any]:
    scenes = {
        split: _scenes(cfg, split, n, root / "images", progress, workers)
        for split, n in (("pretrain", cfg.n_pretrain), ("train", cfg.n_train), ("test", cfg.n_test))
    }
    for split, ss in scenes.items():
        write_jsonl(root / "scenes" / f"{split}.jsonl", [s.to_dict() for s in ss])

    # classification: label of the (unique) largest object; the last fraction is the test set
    n_cls_test = int(round(cfg.class_test_fraction * cfg.n_pretrain))
    cls = []
    for s in scenes["pretrain"]:
        big = max(s.objects, key=lambda o: SIZES.index(o.size))
        cls.append(ClassItem(id=s.id, image=s.image, label=big.label, label_name=CLASS_NAMES[big.label]))
    n_cls_train = cfg.n_pretrain - n_cls_test
    write_jsonl(root / "classification" / "train.jsonl", cls[:n_cls_train])
    write_jsonl(root / "classification" / "test.jsonl", cls[n_cls_train:])

    texts: list[str] = [VQA_SUFFIX, GROUNDING_PROMPT.format(ref="")]
    train: list[TrainRecord] = []
    for i, s in enumerate(scenes["train"]):
        # one multi-turn conversation per image, as in llava_v1_5_mix665k: VQA and grounding turns
        # in a seeded order; metadata["turns"][k] describes the k-th question/answer pair
        rng = _rng(cfg, "train", i, 1)
        pairs = []
        for qtype, q, a in scene_questions(s, cfg.questions_per_image, rng):
            pairs.append((f"{q}\n{VQA_SUFFIX}", a, {"task": "vqa", "qtype": qtype}))
        for k, ref in scene_refs(s, cfg.refs_per_image, rng):
            box = s.objects[k].box
            answer = format_box(square_frame_box(box, (s.width, s.height)))
            pairs.append(
                (GROUNDING_PROMPT.format(ref=ref), answer, {"task": "ref", "box": [float(v) for v in box]})
            )
        pairs = [pairs[j] for j in rng.permutation(len(pairs))]
        train.append(_record(s.id, s.image, pairs, {"image_size": [s.width, s.height]}))
    texts += [t.value for r in train for t in r.conversations]
    write_json(root / "train" / "llava.json", train)

    vqa: list[EvalItem] = []
    refs: list[EvalItem] = []
    for i, s in enumerate(scenes["test"]):
        rng, noise = _rng(cfg, "test", i, 1), _rng(cfg, "test", i, 2)
        size = [s.width, s.height]
        for qtype, q, a in scene_questions(s, cfg.questions_per_image, rng):
            answers = _noisy_answers(a, qtype, cfg, noise)
            vqa.append(
                EvalItem(
                    id=f"vqa-{len(vqa):06d}",
                    image=s.image,
                    benchmark="toy-vqa",
                    split="test",
                    question=q,
                    answers=answers,
                    image_size=size,
                    metadata={"qtype": qtype},
                )
            )
            texts += [q, *answers]
        for k, ref in scene_refs(s, cfg.refs_per_image, rng):
            box = [float(v) for v in s.objects[k].box]
            refs.append(
                EvalItem(
                    id=f"ref-{len(refs):06d}",
                    image=s.image,
                    benchmark="toy-ref",
                    split="test",
                    ref=ref,
                    box=box,
                    image_size=size,
                    metadata={"n_objects": len(s.objects)},
                )
            )
            texts += [ref, format_box(square_frame_box(box, (s.width, s.height)))]
    write_jsonl(root / "eval" / "toy-vqa.jsonl", vqa)
    write_jsonl(root / "eval" / "toy-ref.jsonl", refs)

    # every word any answer could take, even where this world happens not to use it
    texts += [a for answers in ANSWER_TYPES.values() for a in answers] + list(SYNONYMS.values())
    vocab = sorted({w for t in texts for w in split_words(t)})
    counts = {
        "images": {split: len(ss) for split, ss in scenes.items()},
        "nonsquare_images": sum(s.width != s.height for ss in scenes.values() for s in ss),
        "objects": sum(len(s.objects) for ss in scenes.values() for s in ss),
        "classification": {"train": n_cls_train, "test": n_cls_test},
        "train_records": len(train),
        "train_vqa": sum(t["task"] == "vqa" for r in train for t in r.metadata["turns"]),
        "train_ref": sum(t["task"] == "ref" for r in train for t in r.metadata["turns"]),
        "toy-vqa": len(vqa),
        "toy-ref": len(refs),
    }
    meta = {
        "version": WORLD_VERSION,
        "config": asdict(cfg),
        "seed": cfg.seed,
        "counts": counts,
        "class_names": list(CLASS_NAMES),
        "shapes": list(SHAPES),
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "sizes": list(SIZES),
        "qtypes": list(QTYPES),
        "answer_types": {k: list(v) for k, v in ANSWER_TYPES.items()},
        "image_token": IMAGE_TOKEN,
        "vqa_suffix": VQA_SUFFIX,
        "grounding_prompt": GROUNDING_PROMPT,
        "vocab": vocab,
        "chars": sorted({c for t in texts for c in t.replace(IMAGE_TOKEN, "")}),
    }
    write_json(root / "meta.json", meta, indent=1)  # last: its presence marks a complete world
    return meta


def _record(
    rid: str, image: str, pairs: list[tuple[str, str, dict]], metadata: dict[str, Any]
) -> TrainRecord:
    """A LLaVA conversation: the image token opens the first human turn."""
    conversations = []
    for k, (human, gpt, _) in enumerate(pairs):
        conversations += [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{human}" if k == 0 else human},
            {"from": "gpt", "value": gpt},
        ]
    return TrainRecord(
        id=rid,
        image=image,
        conversations=conversations,
        metadata={**metadata, "turns": [p[2] for p in pairs]},
    )


def read_meta(root: str | os.PathLike) -> dict[str, Any] | None:
    """The world's meta.json, or None where there is none."""
    path = Path(root) / "meta.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def generate_world(
    cfg: WorldConfig,
    out_dir: str | os.PathLike,
    progress: bool = True,
    overwrite: bool = False,
    workers: int = 1,
) -> Path:
    """Writes the world of `cfg` to `out_dir` (idempotent: nothing to do if it is already there).

    The world is built in a temporary sibling directory and renamed into place, so `out_dir` is
    either absent, a complete world, or an old world. Layout:

        images/{pretrain,train,test}/<id>.png
        scenes/{pretrain,train,test}.jsonl   every object: shape, colour, size, drawing square, box
        classification/{train,test}.jsonl    ClassItem (label = shape * 6 + colour of the largest object)
        train/llava.json                     TrainRecord list: one multi-turn conversation per image
        eval/toy-vqa.jsonl, eval/toy-ref.jsonl  EvalItem
        meta.json                            config, counts, class names, vocabulary

    Args:
        cfg: the world's config.
        out_dir: where to write it.
        progress: show tqdm bars.
        overwrite: replace a world of another config (a directory that is not a world is never replaced).
        workers: processes rendering images (the output does not depend on it).
    """
    out = Path(out_dir)
    want = {"version": WORLD_VERSION, "config": asdict(cfg)}
    if out.exists():
        meta = read_meta(out)
        if meta is not None and {k: meta.get(k) for k in want} == want:
            return out
        if meta is None and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a toy world (no meta.json); not touching it")
        if meta is not None and not overwrite:
            raise FileExistsError(
                f"{out} holds a toy world of another config; pass overwrite=True to replace it"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _write(cfg, tmp, progress, workers)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def world_vocabulary(root: str | os.PathLike) -> list[str]:
    """Every token (`split_words`) of the world's text, sorted; read from its meta.json."""
    meta = read_meta(root)
    if meta is None:
        raise FileNotFoundError(f"{Path(root) / 'meta.json'} not found: generate the world first")
    return list(meta["vocab"])
