"""Converts GQA testdev-balanced (12,578 questions) to the unified schema.

Official file (GQA questions1.2.zip): testdev_balanced_questions.json; images: GQA images/.

    python data_prep/convert_gqa.py --src dl/gqa --images dl/gqa/images --out data/real

Writes eval/gqa.jsonl under --out, links <out>/images/gqa to --images (or copies the used images
with --copy-images) and writes <out>/manifests/ with the counts and every skipped record; prints
counts in / out / skipped. Evaluation records are in the public harness's order (a seed-21 shuffle).
--slim keeps the harness's slim subset, --skip-bad skips bad records instead of stopping, --download
fetches the official files first. Rules (image paths, boxes, order, bad input):
vlmlab/data/convert.py.
"""

import sys

from vlmlab.data.convert import run_cli

if __name__ == "__main__":
    sys.exit(run_cli("gqa", doc=__doc__))
