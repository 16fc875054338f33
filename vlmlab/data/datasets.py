"""From records to tensors: images through a geometry policy, conversations to ids with masked labels.

The model sees every image through a named geometry policy (vlmlab.geometry); grounding answers
are rendered in that same frame, so a box in the training text always matches the pixels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from vlmlab import geometry
from vlmlab.data.schema import load_image
from vlmlab.geometry import format_box
from vlmlab.vlm.model import IGNORE
from vlmlab.vlm.prompts import PromptTemplate

BOX_RE = re.compile(r"^\s*\[[^\[\]]*\]\s*$")


def plan_for(size: tuple[int, int], spec, policy: str | None, img_size: int) -> geometry.ImageTransform:
    """The ImageTransform an encoder applies to an image of `size` (w, h)."""
    fill = tuple(int(round(255 * m)) for m in spec.mean)
    return geometry.plan(policy or spec.policy, size, img_size, fill=fill)


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def iter_pixel_batches(
    root: Path,
    records: Sequence,
    spec,
    policy: str | None,
    img_size: int,
    batch_size: int = 64,
    desc: str = "images",
) -> Iterator[tuple[list, torch.Tensor, list[geometry.ImageTransform]]]:
    """Yields (records, pixels [b,3,S,S], transforms) for records that carry `.image` (and `.id`)."""
    for i in tqdm(range(0, len(records), batch_size), desc=desc, leave=False):
        chunk = records[i : i + batch_size]
        pix, tfs = [], []
        for r in chunk:
            img = load_image(root, r)
            tf = plan_for(img.size, spec, policy, img_size)
            pix.append(to_tensor(tf.apply(img), spec.mean, spec.std))
            tfs.append(tf)
        yield chunk, torch.stack(pix), tfs


def turn_metadata(record, pair_index: int) -> dict:
    """What the toy world records about question/answer pair k (task, qtype, pixel box); {} if nothing."""
    turns = (record.metadata or {}).get("turns") or []
    return turns[pair_index] if pair_index < len(turns) else {}


def render_answer(record, pair_index: int, text: str, tf: geometry.ImageTransform) -> str:
    """Re-renders a grounding answer in the model's input frame (toy records carry the pixel box)."""
    meta = turn_metadata(record, pair_index)
    if meta.get("task") == "ref" and meta.get("box") is not None and BOX_RE.match(text):
        return format_box(tf.box_to_normalized(tf.box_to_input(meta["box"])))
    return text


def tokenize_conversation(
    record, template: PromptTemplate, tokenizer, tf: geometry.ImageTransform | None, max_length: int
) -> tuple[list[int], list[int], bool]:
    """Token ids and labels (IGNORE except assistant turns), like prismatic-vlms: turn by turn.

    Returns (ids, labels, truncated). The first id is BOS (not doubled, see `prompt_ids`); visual
    tokens are inserted after it later.
    """
    ids: list[int] = []
    labels: list[int] = []
    for i, turn in enumerate(record.conversations):
        text = turn.value if i % 2 == 0 or tf is None else render_answer(record, i // 2, turn.value, tf)
        piece = tokenizer(template.tokenized_turn(i, text), add_special_tokens=False).input_ids
        ids += piece
        labels += piece if i % 2 == 1 else [IGNORE] * len(piece)
    if ids[:1] != [tokenizer.bos_token_id]:
        ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE] + labels
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def prompt_ids(text: str, template: PromptTemplate, tokenizer) -> list[int]:
    """Ids of a generation prompt: BOS + the human turn up to where the answer starts.

    BOS is not doubled where the template's text starts with it (ChatML tokenizers whose BOS is
    <|im_start|>); the visual tokens always go right after the first token.
    """
    ids = tokenizer(template.generation_prompt(text), add_special_tokens=False).input_ids
    return ids if ids[:1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id] + ids
