"""Toy dense adaptation: the analogue of the paper's detection / segmentation-adapted backbones.

The paper (finding 2) fine-tunes backbones with Mask R-CNN on COCO or UperNet on ADE20K, discards
the task heads and uses the adapted backbone as the frozen VLM encoder. Here every toy encoder
starts from its matched-init (classification) checkpoint, gets a small head on the tapped feature
map (`enc.forward_map`, the grid the VLM sees) and trains with the one pretraining recipe
(`cfg.pretrain`) on the classification train images, whose pretrain scenes give dense targets:

- detection (CenterNet-style, one grid cell per object): per cell a class-agnostic centre logit
  (target 1 at the cell holding an object's box centre; BCE), a box (normalised x1, y1, x2, y2 of
  the input frame, decoded from a cell-relative centre offset and a sigmoid size; L1 on positive
  cells) and the object's shape x colour class (CE over 36, positive cells). Where two centres
  share a cell, the larger object keeps it.
- segmentation: per cell the label at the cell centre: 0 background, else 1 + the shape index of
  the top-most object covering it (objects are drawn in list order, later on top) — 7 classes
  (shape, not shape x colour: the semantic category, as ADE20K's); CE.

Boxes and masks reach the input frame through the encoder's default geometry policy
(vlmlab.geometry.ImageTransform), like its pixels. Only the parameters the tapped map depends on
train; the rest (layers after the tap, the classification head) stay frozen, so the saved
`enc.model.state_dict()` keeps the classification head as it was and the usual loader reads it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.config import Config
from vlmlab.data.datasets import iter_pixel_batches
from vlmlab.data.schema import load_class
from vlmlab.data.toyworld import COLOURS, SHAPES, ToyObject, load_scenes, object_mask
from vlmlab.encoders import load_encoder
from vlmlab.encoders.checkpoints import save_safetensors
from vlmlab.features import file_sha256
from vlmlab.io import atomic_write_json, read_json
from vlmlab.pretrain import run_recipe
from vlmlab.train import toy_encoder_weights, world_root

TASKS = ("detection", "segmentation")
N_CLASSES = len(SHAPES) * len(COLOURS)  # shape x colour, ToyObject.label
N_SEG = 1 + len(SHAPES)  # background + shapes
HEAD_OUT = {"detection": 1 + 4 + N_CLASSES, "segmentation": N_SEG}
HEADLINE = {"detection": "toy_det_recall50", "segmentation": "toy_seg_miou"}


# ---- targets on the token grid -------------------------------------------------------------------


def scene_objects(scene: dict) -> list[ToyObject]:
    objs = scene["objects"]
    return [ToyObject(o["shape"], o["colour"], o["size"], tuple(o["square"]), tuple(o["box"])) for o in objs]


def detection_targets(scene: dict, tf, stride: int) -> dict[str, torch.Tensor]:
    """heat [h,w] (1 at object centre cells), box [h,w,4] (normalised input frame), cls [h,w] (-1 none),
    n: objects whose centre lies in the input frame (the recall denominator)."""
    w, h = (s // stride for s in tf.out_size)
    heat, box = torch.zeros(h, w), torch.zeros(h, w, 4)
    cls, area = torch.full((h, w), -1), torch.zeros(h, w)
    n = 0
    for o in scene_objects(scene):
        b = tf.box_to_input(o.box)
        i, j = math.floor((b[1] + b[3]) / 2 / stride), math.floor((b[0] + b[2]) / 2 / stride)
        a = (b[2] - b[0]) * (b[3] - b[1])
        if not (0 <= i < h and 0 <= j < w):
            continue  # a cropping policy cut the centre out
        n += 1
        if a > area[i, j]:  # the larger object keeps a shared cell
            heat[i, j], cls[i, j], area[i, j] = 1.0, o.label, a
            box[i, j] = torch.tensor(tf.box_to_normalized(b))
    return {"heat": heat, "box": box, "cls": cls, "n": torch.tensor(n)}


def segmentation_targets(scene: dict, tf, stride: int) -> torch.Tensor:
    """[h,w] long: 0 background (or padding), else 1 + shape of the top-most object at the cell centre."""
    W0, H0 = scene["image_size"]
    labels = np.zeros((H0, W0), dtype=np.int64)
    for o in scene_objects(scene):  # drawing order: later objects are on top
        labels[object_mask(o, W0, H0)] = 1 + SHAPES.index(o.shape)
    w, h = (s // stride for s in tf.out_size)
    out = torch.zeros(h, w, dtype=torch.long)
    for i in range(h):
        for j in range(w):
            x, y = tf.point_to_original(((j + 0.5) * stride, (i + 0.5) * stride))
            if 0 <= x < W0 and 0 <= y < H0:
                out[i, j] = int(labels[int(y), int(x)])
    return out


def _dense_data(root: Path, items, scenes: dict, enc, cfg: Config, task: str):
    xs, ts = [], []
    make = detection_targets if task == "detection" else segmentation_targets
    # the encoder's default policy: the adapted checkpoint is one per (encoder, img_size, task)
    for chunk, pix, tfs in iter_pixel_batches(root, items, enc.spec, None, cfg.img_size, 256, "load images"):
        xs.append(pix)
        ts += [make(scenes[it.image], tf, enc.spec.stride) for it, tf in zip(chunk, tfs, strict=True)]
    if task == "segmentation":
        return torch.cat(xs), torch.stack(ts)
    return torch.cat(xs), {k: torch.stack([t[k] for t in ts]) for k in ts[0]}


def _take(t, idx, device):
    return {k: v[idx].to(device) for k, v in t.items()} if isinstance(t, dict) else t[idx].to(device)


# ---- head, loss, metrics -------------------------------------------------------------------------


def dense_head(dim: int, out: int) -> nn.Module:
    """A per-cell MLP (1x1 convs) on the tapped map; discarded after adaptation."""
    return nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.Conv2d(dim, out, 1))


def decode_boxes(raw: torch.Tensor) -> torch.Tensor:
    """[B,4,h,w] (centre offset in cells, logit sizes) -> [B,h,w,4] normalised x1, y1, x2, y2."""
    h, w = raw.shape[-2:]
    cx = (torch.arange(w, device=raw.device) + 0.5 + raw[:, 0]) / w
    cy = (torch.arange(h, device=raw.device)[:, None] + 0.5 + raw[:, 1]) / h
    bw, bh = torch.sigmoid(raw[:, 2]), torch.sigmoid(raw[:, 3])
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of [..., 4] x1, y1, x2, y2 boxes."""
    wh = torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])
    inter = wh.clamp(min=0).prod(-1)
    area = lambda t: (t[..., 2:] - t[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


def dense_loss(task: str, out: torch.Tensor, tgt) -> torch.Tensor:
    if task == "segmentation":
        return F.cross_entropy(out, tgt)
    pos = tgt["cls"] >= 0
    loss = F.binary_cross_entropy_with_logits(out[:, 0], tgt["heat"])
    if pos.any():
        box, logits = decode_boxes(out[:, 1:5])[pos], out[:, 5:].permute(0, 2, 3, 1)[pos]
        loss = loss + 5.0 * F.l1_loss(box, tgt["box"][pos]) + F.cross_entropy(logits, tgt["cls"][pos])
    return loss


@torch.no_grad()
def evaluate_dense(task: str, enc, head, x: torch.Tensor, tgt, device: str, batch: int = 256) -> dict:
    """Toy dense metrics on the grid.

    detection: an object is found when its centre cell (the one its target sits in) has a centre
    probability > 0.5 that is a 3x3 local maximum (a peak) and the cell's box has IoU >= 0.5 with the
    object's box. toy_det_recall50 = found / objects with their centre in the frame (objects that lost
    a shared cell count as missed); _class also needs the arg-max class right; toy_det_precision50 =
    found / peaks above 0.5. segmentation: toy_seg_miou = mean over classes present in targets or
    predictions of TP / (TP + FP + FN) over all test cells; toy_seg_cell_acc = share of cells right.
    """
    enc.eval()
    head.eval()
    out = [head(enc.forward_map(x[i : i + batch].to(device))).float().cpu() for i in range(0, len(x), batch)]
    out = torch.cat(out)
    if task == "segmentation":
        pairs = tgt.flatten() * N_SEG + out.argmax(1).flatten()  # confusion matrix [target, prediction]
        conf = torch.bincount(pairs, minlength=N_SEG**2).view(N_SEG, N_SEG)
        tp, union = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag()
        return {
            "toy_seg_miou": (tp[union > 0] / union[union > 0]).mean().item(),
            "toy_seg_cell_acc": (tp.sum() / conf.sum()).item(),
        }
    p = torch.sigmoid(out[:, 0])
    peak = (p > 0.5) & (p == F.max_pool2d(p[:, None], 3, 1, 1)[:, 0])
    found = peak & (tgt["cls"] >= 0) & (box_iou(decode_boxes(out[:, 1:5]), tgt["box"]) >= 0.5)
    found_cls = found & (out[:, 5:].argmax(1) == tgt["cls"])
    n = max(int(tgt["n"].sum()), 1)
    return {
        "toy_det_recall50": found.sum().item() / n,
        "toy_det_recall50_class": found_cls.sum().item() / n,
        "toy_det_precision50": found.sum().item() / max(int(peak.sum()), 1),
    }


def tap_parameters(enc, pixels: torch.Tensor) -> list[str]:
    """Marks trainable exactly the parameters of `enc.model` that the tapped map depends on (one probe
    backward in eval mode, so no running statistics move); returns their names."""
    for p in enc.model.parameters():
        p.requires_grad_(True)
        p.grad = None
    enc.eval()
    enc.forward_map(pixels).float().sum().backward()
    names = [n for n, p in enc.model.named_parameters() if p.grad is not None]
    for n, p in enc.model.named_parameters():
        p.grad = None
        p.requires_grad_(n in names)
    return names


# ---- adaptation ----------------------------------------------------------------------------------


def adapt_encoder(cfg: Config, name: str, task: str, device: str | None = None, force: bool = False) -> Path:
    """Adapts `name`'s classification checkpoint on toy `task` (detection | segmentation); returns the
    path of the adapted checkpoint (head discarded, official key layout)."""
    if task not in TASKS:
        raise ValueError(f"unknown adaptation task {task!r}; known: {', '.join(TASKS)}")
    src = toy_encoder_weights(cfg, name, "classification")
    if not src.is_file():
        raise FileNotFoundError(
            f"{src}: no classification checkpoint of {name} to adapt; run "
            f"python data_prep/pretrain_encoders.py --preset {cfg.name} --encoders {name}"
        )
    pc = cfg.pretrain
    out, src_sha = toy_encoder_weights(cfg, name, task), file_sha256(src)
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file() and not force:
        old = read_json(meta)
        if old.get("recipe") == vars(pc) and old.get("started_from_sha256") == src_sha:
            return out  # same recipe from the same start already adapted
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(pc.seed)
    root = world_root(cfg)

    # 1. the matched-init encoder and a fresh task head on its tapped map
    enc = load_encoder(name, weights=str(src), img_size=cfg.img_size).to(device)
    head = dense_head(enc.spec.dim, HEAD_OUT[task]).to(device)

    # 2. the classification images with their scenes as dense targets
    scenes = load_scenes(root, "pretrain")
    split = lambda s: load_class(root / "classification" / f"{s}.jsonl")  # noqa: E731
    x_tr, t_tr = _dense_data(root, split("train"), scenes, enc, cfg, task)
    x_te, t_te = _dense_data(root, split("test"), scenes, enc, cfg, task)

    # 3. train what the tap depends on; the classification head (and layers after the tap) stay frozen
    tap_parameters(enc, x_tr[:2].to(device))
    params = [p for p in enc.model.parameters() if p.requires_grad] + list(head.parameters())

    # 4. the pretraining recipe, shared code
    enc.train()
    head.train()
    t0 = time.time()
    run_recipe(
        pc,
        params,
        len(x_tr),
        lambda idx: dense_loss(task, head(enc.forward_map(x_tr[idx].to(device))), _take(t_tr, idx, device)),
        f"adapt {name} ({task})",
    )
    train_seconds = round(time.time() - t0, 1)

    # 5. evaluate, then keep the backbone only (the task head is discarded)
    metrics = evaluate_dense(task, enc, head, x_te, t_te, device)
    facts = {"encoder": name, "world": cfg.world, "init": task}
    save_safetensors(enc.model.state_dict(), out, metadata=facts)
    atomic_write_json(
        meta,
        {
            "encoder": name,
            "family": enc.spec.family,
            "params": enc.spec.params,
            "img_size": cfg.img_size,
            "world": cfg.world,
            "task": task,
            "recipe": vars(pc),
            "metric": HEADLINE[task],
            **metrics,
            "train_seconds": train_seconds,
            "n_train": len(x_tr),
            "n_test": len(x_te),
            "started_from": src.name,
            "started_from_sha256": src_sha,
        },
    )
    return out


def adapt_report(cfg: Config, names: list[str], task: str) -> list[dict]:
    """The saved adaptation facts (toy dense metric etc.) of each encoder for `task`."""
    return [read_json(toy_encoder_weights(cfg, n, task).with_suffix(".json")) for n in names]


def encoder_table(cfg: Config, names: list[str] | None = None) -> list[dict]:
    """One row per toy encoder of the preset: its matched-init toy top-1 and, where the encoder was
    adapted, the toy detection recall@0.5 and segmentation mIoU (from the saved reports)."""
    rows = []
    for name in names or [n for n in cfg.encoders if n.startswith("toy-")]:
        base = read_json(toy_encoder_weights(cfg, name).with_suffix(".json"))
        row = {k: base[k] for k in ("encoder", "family", "params", "toy_top1")}
        for task, metric in HEADLINE.items():
            report = toy_encoder_weights(cfg, name, task).with_suffix(".json")
            row[metric] = read_json(report)[metric] if report.is_file() else None
        rows.append(row)
    return rows
