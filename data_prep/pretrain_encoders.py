"""Matched initialization: pretrain every toy encoder of a preset with one identical recipe.

    python data_prep/pretrain_encoders.py --preset toy-cpu [--encoders toy-vmamba toy-vit] [--force]

Writes data/encoders/<world>/<encoder>-<size>px.safetensors (official key layout) and a .json with
the toy top-1 accuracy, parameter count and recipe. Finished encoders are skipped.
"""

import argparse

from vlmlab.config import load_preset
from vlmlab.pretrain import pretrain_encoder, pretrain_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy-cpu")
    ap.add_argument("--encoders", nargs="*", default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_preset(a.preset, a.overrides)
    names = a.encoders or [e for e in cfg.encoders if e.startswith("toy-")]
    for name in names:
        print("wrote", pretrain_encoder(cfg, name, force=a.force))
    for r in pretrain_report(cfg, names):
        print(
            f"{r['encoder']:<20} {r['family']:<7} params={r['params']:>9,} toy top-1={r['toy_top1']:.3f} "
            f"({r['train_seconds']}s)"
        )


if __name__ == "__main__":
    main()
