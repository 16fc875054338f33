"""Converts RefCOCO, RefCOCO+ and RefCOCOg val (referring expressions with boxes) to the unified schema.

Official files (refer's data folder): refcoco/refs(unc).p, refcoco+/refs(unc).p and
refcocog/refs(umd).p, each beside its instances.json (the refs pickles are plain data, read without
executing code); images: COCO train2014.

    python data_prep/convert_refcoco.py --src dl/refer --images dl/coco/train2014 --out data/real

Writes eval/refcoco.jsonl, eval/refcoco+.jsonl and eval/refcocog.jsonl under --out, links
<out>/images/refcoco to --images (or copies the used images with --copy-images) and writes
<out>/manifests/ with the counts and every skipped record; prints counts in / out / skipped.
Evaluation records are in the public harness's order (a seed-21 shuffle). --slim keeps the harness's
slim subset, --skip-bad skips bad records instead of stopping, --download fetches the official files
first. Rules (image paths, boxes, order, bad input): vlmlab/data/convert.py.
"""

import sys

from vlmlab.data.convert import run_cli

if __name__ == "__main__":
    sys.exit(run_cli("refcoco", doc=__doc__))
