"""Converts POPE on COCO (adversarial, popular, random) to the unified schema.

Official files (AoiDragon/POPE output/coco): coco_pope_{adversarial,popular,random}.json, one JSON
object per line; images: COCO val2014.

    python data_prep/convert_pope.py --src dl/pope --images dl/coco/val2014 --out data/real

Writes eval/pope.jsonl under --out, links <out>/images/pope to --images (or copies the used images
with --copy-images) and writes <out>/manifests/ with the counts and every skipped record; prints
counts in / out / skipped. Evaluation records are in the public harness's order (a seed-21 shuffle).
--slim keeps the harness's slim subset, --skip-bad skips bad records instead of stopping, --download
fetches the official files first. Rules (image paths, boxes, order, bad input):
vlmlab/data/convert.py.
"""

import sys

from vlmlab.data.convert import run_cli

if __name__ == "__main__":
    sys.exit(run_cli("pope", doc=__doc__))
