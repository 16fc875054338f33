"""Converts OCID-Ref val (referring expressions in cluttered table-top scenes) to the unified schema.

Official file (OCID-Ref): val_expressions.json; images: the OCID-dataset folder. Neither has a
stable public URL, so there is no --download.

    python data_prep/convert_ocidref.py --src dl/ocid-ref --images dl/ocid-ref/OCID-dataset --out data/real

Writes eval/ocid-ref.jsonl under --out, links <out>/images/ocidref to --images (or copies the used
images with --copy-images) and writes <out>/manifests/ with the counts and every skipped record;
prints counts in / out / skipped. Evaluation records are in the public harness's order (a seed-21
shuffle). --slim keeps the harness's slim subset, --skip-bad skips bad records instead of stopping.
Rules (image paths, boxes, order, bad input): vlmlab/data/convert.py.
"""

import sys

from vlmlab.data.convert import run_cli

if __name__ == "__main__":
    sys.exit(run_cli("ocidref", doc=__doc__))
