"""Converts AI2D (val and test diagram questions) to the unified schema.

Official files (ai2d-all.zip): ai2d/questions/*.json and ai2d_test_ids.csv; images: ai2d/images/.

    python data_prep/convert_ai2d.py --src dl/ai2d --images dl/ai2d/ai2d/images --out data/real

Writes eval/ai2d.jsonl under --out, links <out>/images/ai2d to --images (or copies the used images
with --copy-images) and writes <out>/manifests/ with the counts and every skipped record; prints
counts in / out / skipped. Evaluation records are in the public harness's order (a seed-21 shuffle).
--slim keeps the harness's slim subset, --skip-bad skips bad records instead of stopping, --download
fetches the official files first. Rules (image paths, boxes, order, bad input):
vlmlab/data/convert.py.
"""

import sys

from vlmlab.data.convert import run_cli

if __name__ == "__main__":
    sys.exit(run_cli("ai2d", doc=__doc__))
