"""Writes the public harness's slim evaluation subsets of a converted dataset root to a new root.

    python data_prep/make_slim.py --root data/real --out data/real-slim
    python data_prep/make_slim.py --root data/real --out data/real-slim --benchmarks vqa-v2 gqa --link

Reads <root>/eval/<benchmark>.jsonl (written by the convert_*.py scripts, in the harness's order) and
writes the first k items of each benchmark, or the first k per split where the harness counts per
split, to <out>/eval/, with the images they use (copied, or symlinked one by one with --link). k and
"per split" are the harness's (vlmlab.evaluate.benchmarks: VQAv2, GQA, VizWiz, TextVQA 1024;
POPE 3x1024; RefCOCO* 1024 each; OCID-Ref 3x1024; TallyQA 2x1024; AI2D 2x1024; VSR has no slim set).
The same subset comes from `convert_*.py --slim`; this script makes it from an existing full root.
"""

import argparse
import sys
from pathlib import Path

from vlmlab.data.convert import make_slim


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="a converted root holding eval/*.jsonl")
    ap.add_argument("--out", type=Path, required=True, help="the slim root to write")
    ap.add_argument("--benchmarks", nargs="+", help="only these benchmarks (default: every eval file)")
    ap.add_argument("--link", action="store_true", help="symlink each used image instead of copying it")
    args = ap.parse_args(argv)
    written = make_slim(args.root, args.out, args.benchmarks, copy_images=not args.link)
    for bench, n in written.items():
        print(f"{bench}: {n} items -> {args.out / 'eval' / (bench + '.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
