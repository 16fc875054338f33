"""Matched initialization: every toy encoder is pretrained with one identical recipe.

The toy analogue of ImageNet-1K pretraining: classify the largest object's shape x colour
(vlmlab.data.toyworld). Same data, steps, optimizer, schedule and seed for every family, so VLM
differences come from the architecture, not the recipe. Checkpoints are written in each family's
official key layout (safetensors), so the real loaders read them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmlab.config import Config
from vlmlab.data.datasets import iter_pixel_batches
from vlmlab.data.schema import load_class
from vlmlab.encoders import create_encoder
from vlmlab.encoders.checkpoints import save_safetensors
from vlmlab.io import atomic_write_json, read_json
from vlmlab.train import get_lr, toy_encoder_weights, world_root


def _pixels(root: Path, items, enc, cfg: Config):
    xs, ys = [], []
    for chunk, pix, _ in iter_pixel_batches(
        root, items, enc.spec, cfg.policy, cfg.img_size, 256, "load images"
    ):
        xs.append(pix)
        ys += [it.label for it in chunk]
    return torch.cat(xs), torch.tensor(ys)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, device: str, batch: int = 256) -> float:
    model.eval()
    hits = sum(
        (model(x[i : i + batch].to(device)).argmax(-1).cpu() == y[i : i + batch]).sum().item()
        for i in range(0, len(x), batch)
    )
    return hits / max(len(x), 1)


def run_recipe(pc, params: list[torch.nn.Parameter], n: int, loss_fn, desc: str) -> None:
    """The one toy-encoder recipe (pretraining and dense adaptation alike): `pc.epochs` epochs over
    `n` examples in seeded random order, AdamW, warmup + cosine (`get_lr`), grad clip 1.0.
    `loss_fn(indices)` returns the loss of that mini-batch."""
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=pc.weight_decay)
    steps_per_epoch = math.ceil(n / pc.batch_size)
    total = pc.epochs * steps_per_epoch
    g = torch.Generator().manual_seed(pc.seed)
    bar = tqdm(range(total), desc=desc, leave=False)
    for step in bar:
        if step % steps_per_epoch == 0:
            order = torch.randperm(n, generator=g)
        idx = order[(step % steps_per_epoch) * pc.batch_size :][: pc.batch_size]
        for group in opt.param_groups:
            group["lr"] = get_lr(step, total, pc)
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


def pretrain_encoder(cfg: Config, name: str, device: str | None = None, force: bool = False) -> Path:
    """Trains `name` (full model with its head) on toy classification; returns the checkpoint path."""
    out = toy_encoder_weights(cfg, name, "classification")
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file() and not force and read_json(meta).get("recipe") == vars(cfg.pretrain):
        return out  # same recipe already trained (a changed recipe retrains)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pc = cfg.pretrain
    torch.manual_seed(pc.seed)
    root = world_root(cfg)
    enc = create_encoder(name, img_size=cfg.img_size)
    x_tr, y_tr = _pixels(root, load_class(root / "classification" / "train.jsonl"), enc, cfg)
    x_te, y_te = _pixels(root, load_class(root / "classification" / "test.jsonl"), enc, cfg)
    model = enc.model.to(device).train()
    t0 = time.time()
    run_recipe(
        pc,
        list(model.parameters()),
        len(x_tr),
        lambda idx: F.cross_entropy(model(x_tr[idx].to(device)), y_tr[idx].to(device), label_smoothing=0.1),
        f"pretrain {name}",
    )
    acc = accuracy(model, x_te, y_te, device)
    save_safetensors(model.state_dict(), out, metadata={"encoder": name, "world": cfg.world})
    atomic_write_json(
        out.with_suffix(".json"),
        {
            "encoder": name,
            "family": enc.spec.family,
            "params": enc.spec.params,
            "img_size": cfg.img_size,
            "world": cfg.world,
            "recipe": vars(pc),
            "toy_top1": acc,
            "train_seconds": round(time.time() - t0, 1),
            "n_train": len(x_tr),
            "n_test": len(x_te),
        },
    )
    return out


def pretrain_report(cfg: Config, names: list[str]) -> list[dict]:
    """The saved pretraining facts (toy top-1 etc.) of each encoder."""
    return [read_json(toy_encoder_weights(cfg, n, "classification").with_suffix(".json")) for n in names]
