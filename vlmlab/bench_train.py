"""Training benchmark: epoch time with the frozen-feature cache vs the encoder on every batch.

`bench_train(args) -> rows` (for `python -m vlmlab.bench train`) trains the same VLM twice in one
process on the same machine: once reading frozen tokens from the on-disk cache (built cold, in a
temporary data folder, so its build time is measured too), once running the frozen encoder on the
pixels of every batch (`train.feature_cache=false`). With the tower frozen both see the same tokens;
only where they come from differs. Numbers are printed and saved by the caller, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from vlmlab.bench import benchmark
from vlmlab.config import data_dir, load_preset

# (flags, argparse kwargs) pairs, for registering the subcommand's own arguments
BENCH_TRAIN_OPTIONS = [
    (("--preset",), {"default": "toy-cpu", "help": "preset whose model, world and recipe are timed"}),
    (("--encoder",), {"default": None, "help": "encoder (default: the preset's first)"}),
    (("--max-steps",), {"type": int, "default": None, "help": "time this many steps instead of one epoch"}),
    (("--device",), {"default": None, "help": "cpu | cuda (default: cuda where available)"}),
    (
        ("--overrides",),
        {"nargs": "*", "default": [], "help": "dotted config overrides, e.g. train.batch_size=16"},
    ),
]


def _data_folder(tmp: Path, world: str) -> Path:
    """A temporary VLMLAB_DATA with the world and toy encoder weights linked in, and no feature cache."""
    from vlmlab.data.toyworld import WORLD_PRESETS, generate_world

    data = tmp / "data"
    (data / "toyworld").mkdir(parents=True)
    real = data_dir()
    if world in WORLD_PRESETS:
        src = real / "toyworld" / world
        if (src / "meta.json").is_file():
            (data / "toyworld" / world).symlink_to(src.resolve())
        else:
            generate_world(WORLD_PRESETS[world], data / "toyworld" / world, progress=False)
    if (real / "encoders").is_dir():
        (data / "encoders").symlink_to((real / "encoders").resolve())
    return data


@benchmark("train", "epoch time of connector training with vs without the feature cache", BENCH_TRAIN_OPTIONS)
def bench_train(args: argparse.Namespace) -> list[dict]:
    """One row per data path (feature cache, encoder per batch) plus the speed-up of the cache."""
    from vlmlab.train import train

    preset = getattr(args, "preset", "toy-cpu")
    overrides = list(getattr(args, "overrides", None) or [])
    max_steps = getattr(args, "max_steps", None)
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    big = 10**9  # no intermediate checkpoints or log lines: both runs write only the final ones
    cfg = load_preset(
        preset,
        overrides
        + [
            "train.epochs=1",
            f"train.max_steps={max_steps or 'null'}",
            f"train.ckpt_every={big}",
            f"train.log_every={big}",
        ],
    )
    encoder = getattr(args, "encoder", None) or cfg.encoders[0]
    rows = []
    old = os.environ.get("VLMLAB_DATA")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        os.environ["VLMLAB_DATA"] = str(_data_folder(Path(tmp), cfg.world))
        try:
            for cache in (True, False):
                cfg.train.feature_cache = cache
                t0 = time.perf_counter()
                run = train(
                    cfg, encoder, run_dir=Path(tmp) / f"run-cache-{cache}", resume=False, device=device
                )
                wall = time.perf_counter() - t0
                done = json.loads((run / "done.json").read_text())
                info = json.loads((run / "run.json").read_text())
                last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])  # the final step's
                rows.append(
                    {
                        "data_path": "feature-cache" if cache else "encoder-per-batch",
                        "encoder": encoder,
                        "device": device,
                        "steps": done["steps"],
                        "examples": info["examples"],
                        "global_batch": info["global_batch"],
                        "prepare_s": done["data_seconds"],
                        "epoch_s": done["loop_seconds"],
                        "wall_s": round(wall, 3),
                        # whole-loop averages from the final metrics line; MFU where the GPU's peak is known
                        "tokens_per_s": last.get("tokens_per_s"),
                        "mfu": last.get("mfu"),
                    }
                )
        finally:
            if old is None:
                os.environ.pop("VLMLAB_DATA", None)
            else:
                os.environ["VLMLAB_DATA"] = old
    cached, live = rows
    for r in rows:  # samples per second of the timed loop
        r["samples_per_s"] = round(
            min(r["steps"] * r["global_batch"], r["examples"]) / max(r["epoch_s"], 1e-9), 1
        )
    rows.append(
        {
            "data_path": "speed-up (cache)",
            "encoder": encoder,
            "device": device,
            # the epoch loop alone, and the first epoch including the cache build (prepare_s)
            "epoch_ratio": round(live["epoch_s"] / max(cached["epoch_s"], 1e-9), 2),
            "first_epoch_ratio": round(
                (live["prepare_s"] + live["epoch_s"]) / (cached["prepare_s"] + cached["epoch_s"]), 2
            ),
        }
    )
    return rows
