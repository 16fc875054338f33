"""Toy dense adaptation: adapt every toy encoder of a preset on toy detection / segmentation.

    python data_prep/adapt_encoders.py --preset toy-cpu [--encoders toy-vmamba toy-vit]
        [--tasks detection segmentation] [--force] [overrides...]
    python data_prep/adapt_encoders.py --preset toy-gpu --table figures/toy-gpu/encoders.csv

Starts from the matched-init checkpoints of data_prep/pretrain_encoders.py, trains backbone + a small
head with the same recipe for every encoder, discards the head and writes
data/encoders/<world>/<encoder>-<size>px-<task>.safetensors (official key layout) and a .json with
the toy dense metric. Finished encoders (same recipe, same start) are skipped.
"""

import argparse

from vlmlab.adapt import TASKS, adapt_encoder, adapt_report, encoder_table
from vlmlab.config import load_preset
from vlmlab.plots import write_csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy-cpu")
    ap.add_argument("--encoders", nargs="*", default=None)
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    ap.add_argument("--force", action="store_true")
    ap.add_argument(
        "--table", default=None, help="only write the encoders' toy top-1 / det / seg table to this CSV"
    )
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_preset(a.preset, a.overrides)
    names = a.encoders or [e for e in cfg.encoders if e.startswith("toy-")]
    if a.table:
        print("wrote", write_csv(encoder_table(cfg, names), a.table))
        return
    for task in a.tasks:
        for name in names:
            print("wrote", adapt_encoder(cfg, name, task, force=a.force))
    for task in a.tasks:
        for r in adapt_report(cfg, names, task):
            print(
                f"{r['encoder']:<20} {r['family']:<7} {task:<12} params={r['params']:>9,} "
                f"{r['metric']}={r[r['metric']]:.3f} ({r['train_seconds']}s)"
            )


if __name__ == "__main__":
    main()
