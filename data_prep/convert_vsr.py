"""Converts VSR zero-shot test (1,222 captions) to the unified schema.

Official file (cambridgeltl/vsr_zeroshot): test.jsonl; images: VSR images/.

    python data_prep/convert_vsr.py --src dl/vsr --images dl/vsr/images --out data/real

Writes eval/vsr.jsonl under --out, links <out>/images/vsr to --images (or copies the used images
with --copy-images) and writes <out>/manifests/ with the counts and every skipped record; prints
counts in / out / skipped. Evaluation records are in the public harness's order (a seed-21 shuffle).
--slim keeps the harness's slim subset, --skip-bad skips bad records instead of stopping, --download
fetches the official files first. Rules (image paths, boxes, order, bad input):
vlmlab/data/convert.py.
"""

import sys

from vlmlab.data.convert import run_cli

if __name__ == "__main__":
    sys.exit(run_cli("vsr", doc=__doc__))
