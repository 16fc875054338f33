"""Generates a toy world (images + unified-schema JSON) for the offline study.

Examples: `python data_prep/make_toyworld.py --preset toy-cpu` writes $VLMLAB_DATA/toyworld/toy-cpu
(default data/toyworld/toy-cpu); `python data_prep/make_toyworld.py --out some/dir --seed 3 --n-train 500`
writes a custom world. Both print what they wrote; an up-to-date world is left as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from vlmlab.data.toyworld import WORLD_PRESETS, WorldConfig, data_root, generate_world, read_meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(WORLD_PRESETS), help="a named world size")
    ap.add_argument("--out", type=Path, help="output directory (default: <data>/toyworld/<preset>)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--image-size", type=int, help="long side in pixels")
    ap.add_argument("--n-pretrain", type=int, help="classification images")
    ap.add_argument("--n-train", type=int, help="VLM training images")
    ap.add_argument("--n-test", type=int, help="VLM evaluation images")
    ap.add_argument("--max-objects", type=int)
    ap.add_argument("--force", action="store_true", help="replace a world of another config at --out")
    ap.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes rendering images (the output does not depend on it)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.preset is None and args.out is None:
        ap.error("give --preset NAME or --out DIR")

    cfg = WORLD_PRESETS[args.preset] if args.preset else WorldConfig()
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cfg)
        if getattr(args, f.name, None) is not None
    }
    cfg = dataclasses.replace(cfg, **overrides)
    out = args.out or data_root() / "toyworld" / args.preset

    before = read_meta(out)
    t0 = time.perf_counter()
    generate_world(cfg, out, progress=not args.quiet, overwrite=args.force, workers=args.workers)
    meta = read_meta(out)
    assert meta is not None
    fresh = (
        before is None or before.get("config") != meta["config"] or before.get("version") != meta["version"]
    )
    c = meta["counts"]
    print(f"{'wrote' if fresh else 'up to date:'} {out} in {time.perf_counter() - t0:.1f}s")
    print(f"  images: {c['images']} ({c['nonsquare_images']} non-square, {c['objects']} objects)")
    print(f"  classification/: {c['classification']} items, {len(meta['class_names'])} classes")
    print(
        f"  train/llava.json: {c['train_records']} records ({c['train_vqa']} VQA, {c['train_ref']} grounding)"
    )
    print(f"  eval/toy-vqa.jsonl: {c['toy-vqa']} questions; eval/toy-ref.jsonl: {c['toy-ref']} expressions")
    print(f"  vocabulary: {len(meta['vocab'])} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
